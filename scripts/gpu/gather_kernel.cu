// A device gather kernel that reads pinned host memory directly (mapped, zero-copy) and
// writes the engine's GPU buffer: the alternative to packing rows into staging on the CPU.
// This file is the source of the PTX that kvdex-transfer would embed; gather_bench.cu times it.
#include <cstdint>

struct GatherRun {
    uint64_t src;  // byte offset in the mapped arena
    uint64_t dst;  // byte offset in the destination
    uint64_t len;  // bytes, a multiple of 16
};

// One warp per run; each lane moves 16 bytes per step. Runs and arena are read through the
// mapping (PCIe reads of whole 16-byte words, coalesced within a warp).
extern "C" __global__ void kvdex_gather_runs(const uint8_t* __restrict__ arena,
                                             uint8_t* __restrict__ dst,
                                             const GatherRun* __restrict__ runs,
                                             uint64_t n_runs) {
    const uint64_t warp = (blockIdx.x * (uint64_t)blockDim.x + threadIdx.x) >> 5;
    const uint32_t lane = threadIdx.x & 31;
    const uint64_t warps = (gridDim.x * (uint64_t)blockDim.x) >> 5;
    for (uint64_t r = warp; r < n_runs; r += warps) {
        const GatherRun run = runs[r];
        const uint4* s = reinterpret_cast<const uint4*>(arena + run.src);
        uint4* d = reinterpret_cast<uint4*>(dst + run.dst);
        const uint64_t words = run.len >> 4;
        for (uint64_t i = lane; i < words; i += 32) d[i] = s[i];
    }
}
