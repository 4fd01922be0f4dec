// Times kvdex_gather_runs (gather_kernel.cu) against a contiguous pinned host-to-device copy of
// the same bytes, for run sizes 256 B to 4 MiB drawn at random from a 1 GiB mapped arena.
// Build and run: nvcc -O3 -arch=sm_90 -o gather_bench gather_bench.cu && ./gather_bench
#include "gather_kernel.cu"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <algorithm>
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { \
    fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e)); exit(1); } } while (0)

int main() {
    const size_t arena_bytes = 1ull << 30, batch = 32ull << 20;
    uint8_t* arena; CK(cudaHostAlloc(&arena, arena_bytes, cudaHostAllocMapped));
    for (size_t i = 0; i < arena_bytes; i += 8) *(uint64_t*)(arena + i) = i * 0x9E3779B97F4A7C15ull;
    uint8_t* arena_dev; CK(cudaHostGetDevicePointer((void**)&arena_dev, arena, 0));
    uint8_t* dst; CK(cudaMalloc(&dst, batch));
    uint8_t* staging; CK(cudaHostAlloc(&staging, batch, 0));
    GatherRun* runs; CK(cudaHostAlloc(&runs, sizeof(GatherRun) * (batch / 256), cudaHostAllocMapped));
    GatherRun* runs_dev; CK(cudaHostGetDevicePointer((void**)&runs_dev, runs, 0));
    GatherRun* runs_gpu; CK(cudaMalloc(&runs_gpu, sizeof(GatherRun) * (batch / 256)));
    cudaStream_t st; CK(cudaStreamCreate(&st));
    cudaEvent_t a, b; CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
    int sms; CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    std::vector<uint8_t> host(batch);
    srand(1);
    printf("{\"what\":\"header\",\"sms\":%d}\n", sms);
    for (size_t size = 256; size <= (4u << 20); size *= 4) {
        size_t n = batch / size, slots = arena_bytes / size;
        for (size_t i = 0; i < n; i++) runs[i] = {((size_t)rand() * 7919u % slots) * size, i * size, size};
        CK(cudaMemcpy(runs_gpu, runs, n * sizeof(GatherRun), cudaMemcpyHostToDevice));
        auto time = [&](auto f) { std::vector<float> v; for (int it = 0; it < 12; it++) {
            CK(cudaEventRecord(a, st)); f(); CK(cudaEventRecord(b, st)); CK(cudaEventSynchronize(b));
            float ms; CK(cudaEventElapsedTime(&ms, a, b)); if (it >= 2) v.push_back(ms); }
            std::sort(v.begin(), v.end()); return v[v.size() / 2]; };
        float limit = time([&] { CK(cudaMemcpyAsync(dst, staging, batch, cudaMemcpyHostToDevice, st)); });
        int best_blocks = 0; float best = 1e9; const char* best_runs = "";
        for (int per_sm : {4, 8, 16, 32}) for (int on_gpu = 0; on_gpu < 2; on_gpu++) {
            int blocks = sms * per_sm;
            float ms = time([&] { kvdex_gather_runs<<<blocks, 256, 0, st>>>(arena_dev, dst, on_gpu ? runs_gpu : runs_dev, n); });
            if (ms < best) { best = ms; best_blocks = blocks; best_runs = on_gpu ? "device" : "mapped"; }
        }
        CK(cudaGetLastError());
        CK(cudaMemcpy(host.data(), dst, batch, cudaMemcpyDeviceToHost));
        bool ok = true;
        for (size_t i = 0; i < n && ok; i++) ok = !memcmp(host.data() + runs[i].dst, arena + runs[i].src, size);
        printf("{\"what\":\"kernel\",\"block_bytes\":%zu,\"gbps\":%.2f,\"limit_gbps\":%.2f,\"ratio\":%.3f,"
               "\"blocks\":%d,\"runs_in\":\"%s\",\"correct\":%s}\n", size, batch / best / 1e6,
               batch / limit / 1e6, limit / best, best_blocks, best_runs, ok ? "true" : "false");
        fflush(stdout);
    }
    return 0;
}
