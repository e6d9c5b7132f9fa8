//! The CPU emulation of generated CUDA: threads of a block are OS threads meeting at a barrier
//! for `__syncthreads` and shuffles, so g++ compiles the generated source unchanged.

use std::process::Command;

/// Definitions that let g++ (C++20) compile generated CUDA source; the test harness defines
/// `mulo_launch` on top.
pub const EMULATION: &str = r#"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <barrier>
#include <thread>
#include <vector>
struct mulo_dim3 { unsigned x, y, z; };
static thread_local mulo_dim3 threadIdx, blockIdx;
static std::barrier<>* mulo_bar;
static double mulo_shfl[256];
#define __global__
#define __device__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(n)
#define __restrict__ __restrict
#define __shared__ static
#define __constant__ static
#define __align__(n) __attribute__((aligned(n)))
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
static inline void __syncthreads() { mulo_bar->arrive_and_wait(); }
static inline double __shfl_xor_sync(unsigned, double v, int o, int) {
    mulo_bar->arrive_and_wait();
    mulo_shfl[threadIdx.x] = v;
    mulo_bar->arrive_and_wait();
    return mulo_shfl[threadIdx.x ^ o];
}
static inline double __shfl_down_sync(unsigned, double v, unsigned d, int width) {
    mulo_bar->arrive_and_wait();
    mulo_shfl[threadIdx.x] = v;
    mulo_bar->arrive_and_wait();
    return (int)(threadIdx.x % 32 % width + d) < width ? mulo_shfl[threadIdx.x + d] : v;
}
static inline float __int_as_float(unsigned x) { float f; memcpy(&f, &x, 4); return f; }
"#;

/// `mulo_launch(grid, kernel, args)`: runs `grid` blocks one after the other, each as 256
/// threads calling `kernel(args)`. The same 256 OS threads run every block of a launch (one
/// spawn per launch, not per block: small kernels have hundreds of mostly idle blocks), and
/// meet at a barrier after each block, so that a block starts only when the previous one has
/// finished, as if it ran alone.
pub const LAUNCH: &str = "static void mulo_launch(unsigned grid, void (*k)(void*), void* a) {
    std::barrier<> bar(256); mulo_bar = &bar;
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < 256; ++t) ts.emplace_back([=, &bar] {
        for (unsigned b = 0; b < grid; ++b) {
            blockIdx = {b, 0, 0}; threadIdx = {t, 0, 0}; k(a);
            bar.arrive_and_wait();
        }
    });
    for (auto& t : ts) t.join();
}
";

/// Compiles `main.cpp` of `dir` (which includes generated source from `dir`) into `dir/step`.
pub fn compile(dir: &std::path::Path) -> std::path::PathBuf {
    let exe = dir.join("step");
    let out = Command::new("g++")
        .args(["-std=c++20", "-O0", "-pthread", "-w", "-o"])
        .arg(&exe)
        .arg(dir.join("main.cpp"))
        .output()
        .expect("g++ runs");
    assert!(
        out.status.success(),
        "g++ failed on the generated source:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Runs the emulated program `exe` on `input` (written to `dir/in.bin`) and returns the f32
/// values it writes to `dir/out.bin`.
pub fn run(exe: &std::path::Path, dir: &std::path::Path, input: &[u8]) -> Vec<f32> {
    let (inp, outp) = (dir.join("in.bin"), dir.join("out.bin"));
    std::fs::write(&inp, input).unwrap();
    let status = Command::new(exe).arg(&inp).arg(&outp).status().unwrap();
    assert!(status.success(), "emulated step failed: {status}");
    std::fs::read(&outp)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Whether g++ is available (required under `CI=true`); prints why `test` is skipped otherwise.
pub fn gxx_or_skip(test: &str) -> bool {
    let ok = Command::new("g++")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        // CI machines have g++ (the Rust toolchain's linker needs a C compiler anyway).
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: no g++ under CI"
        );
        eprintln!("SKIPPED {test}: no g++ to compile the emulated kernels");
    }
    ok
}
