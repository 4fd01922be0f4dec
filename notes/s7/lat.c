#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <time.h>
#include <sys/mman.h>
#include <string.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc,char**argv){
  size_t sz=(size_t)256<<20; int thp=atoi(argv[1]);
  char*p=mmap(0,sz+(2<<20),PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0);
  p=(char*)(((uintptr_t)p+(2<<20)-1)&~((uintptr_t)(2<<20)-1));
  if(thp) madvise(p,sz,MADV_HUGEPAGE); else madvise(p,sz,MADV_NOHUGEPAGE);
  memset(p,1,sz);
  size_t n=sz/64; size_t*perm=malloc(n*sizeof(size_t));
  for(size_t i=0;i<n;i++)perm[i]=i;
  srand(1); for(size_t i=n-1;i>0;i--){size_t j=((size_t)rand()*RAND_MAX+rand())%(i+1);size_t t=perm[i];perm[i]=perm[j];perm[j]=t;}
  for(size_t i=0;i<n;i++) *(size_t*)(p+perm[i]*64)=perm[(i+1)%n]*64;
  size_t c=perm[0]*64; int steps=2000000; double t0=now();
  for(int i=0;i<steps;i++) c=*(size_t*)(p+c);
  double t1=now(); printf("thp=%d chase %.1f ns/load (%zu)\n",thp,(t1-t0)/steps*1e9,c);
  // random 256B rows gather with prefetch, 32 at a time
  size_t rows=sz/256; volatile double acc=0; int batches=200000; t0=now(); uint64_t x=88172645463325252ull;
  for(int b=0;b<batches;b++){ size_t ids[32]; for(int k=0;k<32;k++){x^=x<<13;x^=x>>7;x^=x<<17; ids[k]=x%rows; for(int l=0;l<4;l++) __builtin_prefetch(p+ids[k]*256+l*64);} 
    double s=0; for(int k=0;k<32;k++){ double*r=(double*)(p+ids[k]*256); for(int l=0;l<32;l+=8) s+=r[l];} acc+=s;}
  t1=now(); printf("thp=%d gather %.1f ns/row %.2f GB/s\n",thp,(t1-t0)/(batches*32.0)*1e9, batches*32.0*256/(t1-t0)/1e9);
  return 0;}
