//! The CPU emulation of generated CUDA: threads of a block are OS threads meeting at a barrier
//! for `__syncthreads` (and the 32 threads of a warp at the warp's own barrier for shuffles),
//! so g++ compiles the generated source unchanged.
//!
//! It is made as unkind as the hardware, so that a defect the GPU would show shows here too:
//! - scratch, partials and round buffers hold NaN bytes ([`POISON`]) at the start of every
//!   step (the harnesses allocate them with [`poisoned`]; on the GPU they keep the last step's
//!   values), so a read before a write of the step gives NaN;
//! - `__shared__` arrays hold NaN bytes at the start of every block (on the GPU they hold
//!   whatever the multiprocessor's last block left);
//! - the blocks of a launch run one at a time in ascending, descending or shuffled order
//!   ([`LAUNCH`]; `MULO_EMU_SEED` and `MULO_EMU_ORDER`), so a block that reads another block's
//!   output of the same launch reads poison in one of the orders;
//! - a shuffle waits for the 32 threads of its warp only, not the block (a missing
//!   `__syncthreads` after one is a data race, which ThreadSanitizer reports:
//!   `MULO_EMU_SANITIZE=thread`);
//! - the source is compiled with `MULO_UPLOAD_CONSTANTS` defined, as NVRTC compiles it: the
//!   weights' `__constant__` arrays are declared without values, poisoned at load, and filled
//!   from the manifest's `constants` as `loader::Module::fill_constants` does
//!   ([`constants_loader`]);
//! - no FMA contraction (`-ffp-contract=off`), as the interpreter; NVRTC contracts
//!   (`--fmad=true`), so GPU results are compared within a tolerance (docs/cuda.md, "Bitwise
//!   across targets").
//!
//! `MULO_EMU_SANITIZE=address,undefined` (or `thread`) builds the programs with those
//! sanitizers, which abort a run on the first report (`.ci/steps/emulation_sanitize.sh`).

use mulo::backend::cuda::manifest::ConstantJson;
use mulo::backend::cuda::render::UPLOAD_MACRO;
use std::path::Path;
use std::process::Command;

/// The byte that every poisoned buffer is filled with: four (eight) of them are a quiet NaN
/// as an `f32` (`f64`), and `-1` as an integer.
pub const POISON: u8 = 0xFF;

/// `len` bytes of [`POISON`]: a scratch, partials or round buffer at the start of a step.
pub fn poisoned(len: usize) -> Vec<u8> {
    vec![POISON; len]
}

/// Definitions that let g++ (C++20) compile generated CUDA source; the test harness defines
/// `mulo_launch` on top.
pub const EMULATION: &str = r#"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <algorithm>
#include <barrier>
#include <memory>
#include <numeric>
#include <random>
#include <thread>
#include <vector>
struct mulo_dim3 { unsigned x, y, z; };
static thread_local mulo_dim3 threadIdx, blockIdx;
static std::barrier<>* mulo_bar;
// Each warp's own barrier: a shuffle synchronizes its warp, not the block.
static std::barrier<>* mulo_warp_bar[8];
static double mulo_shfl[256];
#define __global__
#define __device__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(n)
#define __restrict__ __restrict
// Every __shared__ array in one section, which mulo_launch fills with NaN bytes before each
// block (the linker's __start_/__stop_ symbols bound it; weak: a program may have none).
#define __shared__ static __attribute__((section("mulo_shared")))
extern "C" char __start_mulo_shared[] __attribute__((weak));
extern "C" char __stop_mulo_shared[] __attribute__((weak));
#define __constant__ static
#define __align__(n) __attribute__((aligned(n)))
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
static inline void __syncthreads() { mulo_bar->arrive_and_wait(); }
static inline double __shfl_xor_sync(unsigned, double v, int o, int) {
    std::barrier<>* w = mulo_warp_bar[threadIdx.x / 32];
    w->arrive_and_wait();
    mulo_shfl[threadIdx.x] = v;
    w->arrive_and_wait();
    return mulo_shfl[threadIdx.x ^ o];
}
static inline double __shfl_down_sync(unsigned, double v, unsigned d, int width) {
    std::barrier<>* w = mulo_warp_bar[threadIdx.x / 32];
    w->arrive_and_wait();
    mulo_shfl[threadIdx.x] = v;
    w->arrive_and_wait();
    return (int)(threadIdx.x % 32 % width + d) < width ? mulo_shfl[threadIdx.x + d] : v;
}
static inline float __int_as_float(unsigned x) { float f; memcpy(&f, &x, 4); return f; }
// A step's scratch, partials or round buffer: NaN bytes, as the last step might have left.
static void* mulo_poisoned(size_t bytes) {
    void* p = malloc(bytes ? bytes : 1);
    memset(p, 0xFF, bytes);
    return p;
}
"#;

/// `mulo_launch(grid, kernel, args)`: runs `grid` blocks one at a time, each as 256 threads
/// calling `kernel(args)`, with every `__shared__` array poisoned before each block. The same
/// 256 OS threads run every block of a launch (one spawn per launch, not per block: small
/// kernels have hundreds of mostly idle blocks), and meet at a barrier between blocks, so that
/// a block starts only when the previous one has finished, as if it ran alone.
///
/// The blocks' order: launch `k` of a run (a process) takes ascending, descending or shuffled
/// order as `(MULO_EMU_SEED + k) % 3` gives (0, 1, 2), the shuffle drawn from the seed and `k`;
/// `MULO_EMU_ORDER=ascending|descending|shuffled` forces one order on every launch. A harness
/// gives each run of a program the next seed ([`Seeds`]), so over three steps every launch runs
/// in all three orders, at the cost of one.
pub const LAUNCH: &str = r#"static unsigned mulo_launches;
static void mulo_launch(unsigned grid, void (*k)(void*), void* a) {
    static const char* seed_env = getenv("MULO_EMU_SEED");
    static const char* order_env = getenv("MULO_EMU_ORDER");
    const unsigned long long seed = seed_env ? strtoull(seed_env, nullptr, 10) : 0;
    unsigned long long pick = (seed + mulo_launches) % 3;
    if (order_env) {
        if (!strcmp(order_env, "ascending")) pick = 0;
        else if (!strcmp(order_env, "descending")) pick = 1;
        else if (!strcmp(order_env, "shuffled")) pick = 2;
        else { fprintf(stderr, "MULO_EMU_ORDER=%s: not ascending, descending or shuffled\n", order_env); exit(6); }
    }
    std::vector<unsigned> order(grid);
    std::iota(order.begin(), order.end(), 0u);
    if (pick == 1) std::reverse(order.begin(), order.end());
    if (pick == 2) {
        std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + mulo_launches);
        std::shuffle(order.begin(), order.end(), rng);
    }
    ++mulo_launches;
    std::barrier<> bar(256); mulo_bar = &bar;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    for (int w = 0; w < 8; ++w) { warps.emplace_back(new std::barrier<>(32)); mulo_warp_bar[w] = warps.back().get(); }
    const size_t shared = __start_mulo_shared ? (size_t)(__stop_mulo_shared - __start_mulo_shared) : 0;
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < 256; ++t) ts.emplace_back([=, &bar, &order] {
        for (unsigned b = 0; b < grid; ++b) {
            if (t == 0 && shared) memset(__start_mulo_shared, 0xFF, shared);
            bar.arrive_and_wait();
            blockIdx = {order[b], 0, 0}; threadIdx = {t, 0, 0}; k(a);
            bar.arrive_and_wait();
        }
    });
    for (auto& t : ts) t.join();
}
"#;

/// The names of the `__constant__` arrays `source` declares without their values under
/// [`UPLOAD_MACRO`] (the arrays the host fills at load), in order of declaration.
pub fn upload_arrays(source: &str) -> Vec<String> {
    let guard = format!("#ifndef {UPLOAD_MACRO}");
    let lines: Vec<&str> = source.lines().collect();
    lines
        .windows(2)
        .filter(|w| w[1].trim() == guard)
        .filter_map(|w| w[0].strip_prefix("__constant__ "))
        .map(|decl| {
            let name = decl.split('[').next().unwrap_or(decl);
            name.split_whitespace().last().unwrap_or(name).to_string()
        })
        .collect()
}

/// C++ defining `mulo_fill_constants()`, which a program's `main` calls first, as a host calls
/// `fill_constants` after loading the module: it poisons every array of [`upload_arrays`]
/// (`source`'s), then copies each of `constants` (a manifest's) into its array from
/// `dir/constants.bin` (written here), failing with the array's name (exit status 5) when
/// the sizes differ. An array the manifest leaves out stays NaN, so its uses give NaN.
///
/// Panics, naming the array, when `constants` holds an array that `source` does not declare
/// for upload (the module would have no such global).
pub fn constants_loader(dir: &Path, source: &str, constants: &[ConstantJson]) -> String {
    let declared = upload_arrays(source);
    let mut bytes = Vec::new();
    let mut code = String::from("static void mulo_fill_constants() {\n");
    for name in &declared {
        code.push_str(&format!(
            "    memset((void*){name}, 0xFF, sizeof({name}));\n"
        ));
    }
    let path = dir.join("constants.bin");
    code.push_str(&format!(
        "    FILE* f = fopen({:?}, \"rb\"); if (!f) {{ fprintf(stderr, \"no constants file\\n\"); exit(5); }}\n",
        path.to_str().expect("a UTF-8 temporary directory")
    ));
    for c in constants {
        assert!(
            declared.contains(&c.name),
            "the program declares no __constant__ array `{}` to fill",
            c.name
        );
        let values = c.values().expect("the manifest's constants decode");
        bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        code.push_str(&format!(
            "    if (sizeof({0}) != {1} * 4) {{ fprintf(stderr, \"__constant__ array `{0}` has %zu bytes, the manifest gives {1} values\\n\", sizeof({0})); exit(5); }}\n    if (fread((void*){0}, 4, {1}, f) != {1}) exit(5);\n",
            c.name, c.len
        ));
    }
    code.push_str("    fclose(f);\n}\n");
    std::fs::write(&path, bytes).unwrap();
    code
}

/// The sanitizers `MULO_EMU_SANITIZE` asks for (`address,undefined`, `thread`), if any.
fn sanitizers() -> Option<String> {
    std::env::var("MULO_EMU_SANITIZE")
        .ok()
        .filter(|s| !s.is_empty())
}

/// Compiles `main.cpp` of `dir` (which includes generated source from `dir`) into `dir/step`,
/// with [`UPLOAD_MACRO`] defined and no FMA contraction; with the sanitizers of
/// `MULO_EMU_SANITIZE` when set.
pub fn compile(dir: &Path) -> std::path::PathBuf {
    compile_with(dir, sanitizers().as_deref())
}

/// [`compile`] with the sanitizers `sanitize` (`-fsanitize=` values) instead of the
/// environment's.
pub fn compile_with(dir: &Path, sanitize: Option<&str>) -> std::path::PathBuf {
    let exe = dir.join("step");
    let mut cmd = Command::new("g++");
    cmd.args([
        "-std=c++20",
        "-O0",
        "-pthread",
        "-w",
        "-ffp-contract=off",
        &format!("-D{UPLOAD_MACRO}"),
    ]);
    if let Some(s) = sanitize {
        // Abort on the first report, with a stack naming the generated source's line.
        cmd.args([
            &format!("-fsanitize={s}"),
            "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer",
            "-g",
        ]);
    }
    let out = cmd
        .arg("-o")
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

/// The block-order seeds of a program's runs: run `k` gets `MULO_EMU_SEED` (0 when unset) + `k`,
/// so that a failing test is replayed by its seed and successive steps take every order.
#[derive(Debug, Default)]
pub struct Seeds(std::sync::atomic::AtomicU64);

impl Seeds {
    /// The seed of the next run.
    pub fn next(&self) -> u64 {
        let base = std::env::var("MULO_EMU_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0u64);
        base + self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    }
}

/// The command running the emulated program `exe` with block-order seed `seed`.
pub fn command(exe: &Path, seed: u64) -> Command {
    let mut cmd = Command::new(exe);
    cmd.env("MULO_EMU_SEED", seed.to_string());
    if std::env::var_os("ASAN_OPTIONS").is_none() {
        // The programs' buffers live until they exit, as device memory lives until the
        // program is unloaded: LeakSanitizer's reports of them are not defects.
        cmd.env("ASAN_OPTIONS", "detect_leaks=0");
    }
    cmd
}

/// Runs the emulated program `exe` on `input` (written to `dir/in.bin`) with block-order seed
/// `seed`, and returns the f32 values it writes to `dir/out.bin`.
pub fn run(exe: &Path, dir: &Path, input: &[u8], seed: u64) -> Vec<f32> {
    try_run(exe, dir, input, seed, None).unwrap_or_else(|e| panic!("emulated step failed: {e}"))
}

/// [`run`], every launch's blocks in `order` when given (`MULO_EMU_ORDER`); an error holding
/// the exit status and what the program printed when it fails (a sanitizer's report, a
/// constant of the wrong size).
pub fn try_run(
    exe: &Path,
    dir: &Path,
    input: &[u8],
    seed: u64,
    order: Option<&str>,
) -> Result<Vec<f32>, String> {
    let (inp, outp) = (dir.join("in.bin"), dir.join("out.bin"));
    std::fs::write(&inp, input).unwrap();
    let mut cmd = command(exe, seed);
    if let Some(order) = order {
        cmd.env("MULO_EMU_ORDER", order);
    }
    let out = cmd.arg(&inp).arg(&outp).output().unwrap();
    if !out.status.success() {
        return Err(format!(
            "{} (MULO_EMU_SEED={seed}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    eprintln!("emulated step: MULO_EMU_SEED={seed}");
    Ok(std::fs::read(&outp)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
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
