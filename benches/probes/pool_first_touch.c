// Build and run: gcc -O2 -o /tmp/pool_first_touch benches/probes/pool_first_touch.c && /tmp/pool_first_touch
// Where does a put into the shared host pool lose against a private memcpy?
// Copies 1 GiB in 2 MiB blocks into: private THP memory (the bench's
// baseline), private 4K memory (MADV_NOHUGEPAGE), a populated shared memfd
// mapping, the same after MADV_POPULATE_WRITE, and a second mapping of the
// memfd (as a client maps it). Reports GB/s and minor faults per copy.
#define _GNU_SOURCE
#include <sys/mman.h>
#include <sys/resource.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <unistd.h>
#include <time.h>
#define LEN (1UL<<30)
#define BLK (2UL<<20)
static long minflt(){struct rusage r;getrusage(RUSAGE_SELF,&r);return r.ru_minflt;}
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec/1e9;}
static void run(const char*name,char*dst,char*src){
  for(int rep=0;rep<3;rep++){
    long f0=minflt(); double t0=now();
    for(size_t o=0;o<LEN;o+=BLK) memcpy(dst+o,src+o,BLK);
    double t=now()-t0; long f=minflt()-f0;
    printf("%-28s rep %d: %6.2f GB/s  faults %ld\n",name,rep,LEN/t/1e9,f);
  }
}
int main(){
  char*src=mmap(0,LEN,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0);
  madvise(src,LEN,MADV_HUGEPAGE); memset(src,1,LEN);
  char*thp=mmap(0,LEN,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0);
  madvise(thp,LEN,MADV_HUGEPAGE); memset(thp,0,LEN);
  run("private THP (baseline)",thp,src);
  char*p4k=mmap(0,LEN,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0);
  madvise(p4k,LEN,MADV_NOHUGEPAGE); memset(p4k,0,LEN);
  run("private 4K",p4k,src);
  int fd=memfd_create("pool",0); if(ftruncate(fd,LEN)) return 1;
  char*d=mmap(0,LEN,PROT_READ|PROT_WRITE,MAP_SHARED|MAP_POPULATE,fd,0);
  madvise(d,LEN,MADV_HUGEPAGE);
  char*c=mmap(0,LEN,PROT_READ|PROT_WRITE,MAP_SHARED|MAP_POPULATE,fd,0);
  run("memfd client map, populate",c,src);
  run("memfd daemon map, populate",d,src);
  int fd2=memfd_create("pool2",0); if(ftruncate(fd2,LEN)) return 1;
  char*e=mmap(0,LEN,PROT_READ|PROT_WRITE,MAP_SHARED|MAP_POPULATE,fd2,0);
  int rc=madvise(e,LEN,MADV_POPULATE_WRITE);
  char*e2=mmap(0,LEN,PROT_READ|PROT_WRITE,MAP_SHARED,fd2,0);
  int rc2=madvise(e2,LEN,MADV_POPULATE_WRITE);
  printf("populate_write rc %d %d\n",rc,rc2);
  run("memfd client, populate_write",e2,src);
  if(system("uname -r; cat /sys/kernel/mm/transparent_hugepage/shmem_enabled /sys/kernel/mm/transparent_hugepage/enabled; grep -i huge /proc/meminfo | head -3; lscpu | grep -i 'model name\\|numa node(s)'")) return 1;
  return 0;
}
