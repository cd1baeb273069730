/* MKL's Intel code paths on a non-Intel x86 CPU (see bench/README.md, "MKL on AMD CPUs").
 *
 * MKL (linked into torch's libtorch_cpu) chooses its kernels by asking
 * mkl_serv_intel_cpu_true(); on AMD CPUs the answer is no and it runs its AVX2 code even where
 * the CPU has AVX-512 and AVX-512-BF16. Preloaded, this definition is found before MKL's own,
 * so MKL runs the kernels the CPU's instruction set allows, in torch's GEMMs and in ssdfx's
 * kernels alike (ssdfx.ops.blas.MKL_INTEL_PATH reports it):
 *
 *     cc -O2 -shared -fPIC -o mkl_intel_path.so bench/mkl_intel_path.c
 *     LD_PRELOAD=$PWD/mkl_intel_path.so python bench/op.py --quick
 *
 * Use it only on CPUs whose flags include what MKL's Intel paths need (AVX-512 on an AMD Zen 4
 * or Zen 5); the numerics are those of MKL on an Intel CPU of the same instruction set.
 */
int mkl_serv_intel_cpu_true(void) { return 1; }
