//! Crash safety and thread safety.
//!
//! * A checkpoint writer (this test binary, re-run as a child process) is killed with SIGKILL
//!   at random points, repeatedly: the checkpoint at the path always loads, is bit for bit a
//!   checkpoint of the uninterrupted run, and resumes bitwise. Every truncation of a
//!   checkpoint is refused with an error naming the file.
//! * Two processes (each with three threads) compile the same program through the NVRTC disk
//!   cache at once, and a third one after them reads their entry; threads store and load one
//!   cache entry at once, and every load finds it complete.
//! * `MuloOptimizer`, `PlanCache` and the CUDA runtime are `Send + Sync`; optimizers step on
//!   several threads, move between threads, and are read while another thread steps.
//!
//! `MULO_KILL_ROUNDS` sets the number of kills (default 20).

mod common;

use common::{fixture_lopt, nvrtc_or_skip};
use mulo::backend::cuda::nvrtc;
use mulo::backend::PlanCache;
use mulo::lopt::LearnedOptimizer;
use mulo::optimizer::{MuloOptimizer, OptimizerOptions, ParamSpec};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// A deterministic run: parameters and gradients are functions of the step alone, so a run
// resumed from a checkpoint at step k continues exactly as the uninterrupted one.
// ---------------------------------------------------------------------------------------

/// A model with one big tensor, so that a checkpoint (1.6 MB) takes a while to write.
fn big_specs() -> Vec<ParamSpec> {
    let mut specs = vec![ParamSpec::new("big", &[384, 256]).unwrap()];
    specs.extend(small_specs());
    specs
}

fn small_specs() -> Vec<ParamSpec> {
    vec![
        ParamSpec::new("w", &[24, 16]).unwrap(),
        ParamSpec::new("b", &[24]).unwrap(),
        ParamSpec::new("s", &[]).unwrap(),
    ]
}

fn value(step: u64, tensor: usize, i: usize, salt: u64) -> f32 {
    let mut x = step
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add((tensor as u64) << 40)
        .wrapping_add(i as u64)
        .wrapping_add(salt.wrapping_mul(0xbf58_476d_1ce4_e5b9));
    x ^= x >> 31;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 29;
    ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
}

/// The inputs of step `step` of a model: parameters and gradients.
fn inputs(specs: &[ParamSpec], step: u64) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let params = specs
        .iter()
        .enumerate()
        .map(|(t, s)| (0..s.shape.numel()).map(|i| value(step, t, i, 1)).collect())
        .collect();
    let grads = specs
        .iter()
        .enumerate()
        .map(|(t, s)| {
            (0..s.shape.numel())
                .map(|i| 0.01 * value(step, t, i, 2))
                .collect()
        })
        .collect();
    (params, grads)
}

/// Takes the optimizer's next step; returns the new parameters.
fn advance(opt: &mut MuloOptimizer) -> Vec<Vec<f32>> {
    let (mut params, grads) = inputs(opt.params(), opt.step_count());
    let mut ps: Vec<&mut [f32]> = params.iter_mut().map(|p| p.as_mut_slice()).collect();
    let gs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
    opt.step(&mut ps, &gs, 1e-3, 0.0).unwrap();
    params
}

fn optimizer(lopt: &LearnedOptimizer) -> MuloOptimizer {
    MuloOptimizer::new(lopt, big_specs(), OptimizerOptions::default()).unwrap()
}

fn small_optimizer(lopt: &LearnedOptimizer) -> MuloOptimizer {
    MuloOptimizer::new(lopt, small_specs(), OptimizerOptions::default()).unwrap()
}

/// A hash of a checkpoint's content: its metadata (sorted: safetensors writes a map's keys
/// in hash order, so two saves of one state may order them differently) and every tensor's
/// name, dtype, shape and bytes. Equal hashes are bitwise-equal checkpoints.
fn sha(bytes: &[u8]) -> [u8; 32] {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let mut h = Sha256::new();
    let meta: std::collections::BTreeMap<_, _> = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    for (k, v) in meta {
        h.update(format!("{k}={v};").as_bytes());
    }
    let mut names = tensors.names();
    names.sort();
    for name in names {
        let t = tensors.tensor(name).unwrap();
        h.update(format!("{name}:{:?}:{:?}:", t.dtype(), t.shape()).as_bytes());
        h.update(t.data());
    }
    h.finalize().into()
}

/// The child process: saves checkpoints after every step to `MULO_KILL_CHILD`, forever.
#[test]
#[ignore = "the child process of killed_checkpoint_writers_never_lose_the_checkpoint"]
fn checkpoint_writer_child() {
    let Some(path) = std::env::var_os("MULO_KILL_CHILD") else {
        return;
    };
    let path = PathBuf::from(path);
    let mut opt = optimizer(&fixture_lopt());
    eprintln!("child ready");
    loop {
        advance(&mut opt);
        // Saved three times: most of the loop is spent saving, so most kills land in a save.
        for _ in 0..3 {
            opt.save_checkpoint(&path).unwrap();
        }
    }
}

fn self_test(name: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        name,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    cmd
}

/// A small xorshift generator for the kill delays (seeded from the clock, printed).
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn killed_checkpoint_writers_never_lose_the_checkpoint() {
    let lopt = fixture_lopt();
    let rounds: usize = std::env::var("MULO_KILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("kill delays seeded with {seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opt.ckpt");

    // The uninterrupted run's checkpoint hashes, by step, extended as far as needed.
    let mut reference = optimizer(&lopt);
    let mut ref_hashes = vec![sha(&reference.checkpoint_bytes().unwrap())];
    reference.save_checkpoint(&path).unwrap();
    let extend_to = |reference: &mut MuloOptimizer, hashes: &mut Vec<[u8; 32]>, k: u64| {
        while (hashes.len() as u64) <= k {
            advance(reference);
            hashes.push(sha(&reference.checkpoint_bytes().unwrap()));
        }
    };

    let (mut steps_seen, mut mid_write, mut advanced) = (Vec::new(), 0, 0);
    let mut last_step = 0;
    // Kills land inside a save about one time in six: when `rounds` kills had none there,
    // more rounds (up to six times as many in all) are run until one does, so that the assertion
    // below is about the writer, not about luck.
    let max_rounds = rounds * 6;
    let mut round = 0;
    while round < rounds || (mid_write == 0 && round < max_rounds) {
        round += 1;
        let mut child = self_test("checkpoint_writer_child")
            .env("MULO_KILL_CHILD", &path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until the child is past its start-up, then kill it at a random point of its
        // step/save loop.
        let mut stderr = child.stderr.take().unwrap();
        let mut buf = [0u8; 64];
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains("child ready") {
            use std::io::Read;
            let n = stderr.read(&mut buf).unwrap();
            assert!(n > 0, "the child exited before it was ready");
            seen.extend_from_slice(&buf[..n]);
        }
        // A step and a save take about 0.1 s here (debug build): up to several of them.
        std::thread::sleep(Duration::from_micros(rng.below(800_000)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        // The checkpoint at the path loads, is bitwise a checkpoint of the uninterrupted run,
        // and resumes bitwise.
        let bytes = std::fs::read(&path).unwrap();
        let mut resumed = optimizer(&lopt);
        resumed
            .load_checkpoint(&path)
            .unwrap_or_else(|e| panic!("round {round}: the checkpoint does not load: {e}"));
        let k = resumed.step_count();
        extend_to(&mut reference, &mut ref_hashes, k + 2);
        assert_eq!(
            sha(&bytes),
            ref_hashes[k as usize],
            "round {round}: the checkpoint at step {k} differs from the uninterrupted run's"
        );
        for j in 1..=2 {
            advance(&mut resumed);
            assert_eq!(
                sha(&resumed.checkpoint_bytes().unwrap()),
                ref_hashes[(k + j) as usize],
                "round {round}: resuming from step {k} diverged at step {}",
                k + j
            );
        }
        if k != last_step {
            advanced += 1;
        }
        last_step = k;
        steps_seen.push(k);
        // A kill between creating the temporary file and renaming it leaves the temporary
        // behind: proof that this kill landed in the middle of a save.
        let temps = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name() != "opt.ckpt")
            .count();
        if temps > mid_write {
            mid_write = temps;
        }
    }
    println!(
        "{round} kills: checkpoint steps {steps_seen:?}; {mid_write} kills landed inside a \
         save (temporary files left), {advanced} rounds saw a new checkpoint"
    );
    // Without a kill between a save's start and its rename, the atomicity under test was
    // never exercised: a plain `fs::write` would have passed too.
    assert!(
        mid_write > 0,
        "none of {round} kills landed inside a save (no temporary file left): the test \
         exercised no interrupted write"
    );
    assert!(
        advanced > 0,
        "no child ever completed a checkpoint: the test exercised nothing"
    );
}

#[test]
fn every_truncated_or_extended_checkpoint_is_refused_naming_the_file() {
    let lopt = fixture_lopt();
    let specs = vec![
        ParamSpec::new("w", &[5, 3]).unwrap(),
        ParamSpec::new("b", &[4]).unwrap(),
    ];
    let mut opt = MuloOptimizer::new(&lopt, specs.clone(), Default::default()).unwrap();
    let mut p = [vec![0.5f32; 15], vec![0.25f32; 4]];
    let g = [vec![0.1f32; 15], vec![-0.1f32; 4]];
    {
        let mut ps: Vec<&mut [f32]> = p.iter_mut().map(|v| v.as_mut_slice()).collect();
        opt.step(&mut ps, &[&g[0], &g[1]], 1e-2, 0.0).unwrap();
    }
    let full = opt.checkpoint_bytes().unwrap();
    let origin = Path::new("dir/half-written.ckpt");
    let mut target = MuloOptimizer::new(&lopt, specs, Default::default()).unwrap();
    let before = sha(&target.checkpoint_bytes().unwrap());
    for len in 0..full.len() {
        let err = target
            .restore_checkpoint(&full[..len], origin)
            .expect_err(&format!(
                "a prefix of {len} of {} bytes was accepted",
                full.len()
            ));
        assert!(err.to_string().contains("half-written.ckpt"), "{err}");
    }
    let mut longer = full.clone();
    longer.extend_from_slice(b"tail of a newer, longer checkpoint");
    assert!(target.restore_checkpoint(&longer, origin).is_err());
    // Refused inputs changed nothing; the complete one loads.
    assert_eq!(sha(&target.checkpoint_bytes().unwrap()), before);
    target.restore_checkpoint(&full, origin).unwrap();
    assert_eq!(sha(&target.checkpoint_bytes().unwrap()), sha(&full));
}

// ---------------------------------------------------------------------------------------
// The NVRTC disk cache under concurrent writers
// ---------------------------------------------------------------------------------------

const KERNEL: &str =
    "extern \"C\" __global__ void mulo_cache_race(float* x) { x[threadIdx.x] *= 2.0f; }\n";

/// The child process: compiles [`KERNEL`] through the disk cache (`MULO_CACHE_DIR`) on three
/// threads at once and prints each PTX's hash.
#[test]
#[ignore = "the child process of two_processes_compile_the_same_program_through_the_cache"]
fn nvrtc_cache_child() {
    if std::env::var_os("MULO_CACHE_RACE").is_none() {
        return;
    }
    let hashes: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| s.spawn(|| nvrtc::compile(KERNEL, "sm_80", true).unwrap()))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                let c = h.join().unwrap();
                format!("{:x}", Sha256::digest(c.ptx.as_bytes()))
                    + if c.from_cache { "c" } else { "n" }
            })
            .collect()
    });
    println!("PTX {}", hashes.join(" "));
}

#[test]
fn two_processes_compile_the_same_program_through_the_cache() {
    if !nvrtc_or_skip("two_processes_compile_the_same_program_through_the_cache") {
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let children: Vec<_> = (0..2)
        .map(|_| {
            self_test("nvrtc_cache_child")
                .env("MULO_CACHE_RACE", "1")
                .env("MULO_CACHE_DIR", cache.path())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut hashes = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "a compiling process failed");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find_map(|l| l.split_once("PTX ").map(|(_, rest)| rest))
            .expect("the child printed its PTX hashes");
        hashes.extend(line.split(' ').map(str::to_string));
    }
    assert_eq!(hashes.len(), 6);
    // Each hash ends in `n` (compiled by NVRTC) or `c` (read from the cache).
    let compiled = hashes.iter().filter(|h| h.ends_with('n')).count();
    println!(
        "6 compiles in 2 processes: {compiled} by NVRTC, {} from the cache",
        6 - compiled
    );
    // The racing processes may all miss the empty cache; a third one, after them, must read
    // what they stored (three hits) and get the same PTX: otherwise nothing here showed that
    // an entry written under the race is one `compile` uses.
    let out = self_test("nvrtc_cache_child")
        .env("MULO_CACHE_RACE", "1")
        .env("MULO_CACHE_DIR", cache.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "the third compiling process failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let third: Vec<&str> = text
        .lines()
        .find_map(|l| l.split_once("PTX ").map(|(_, rest)| rest))
        .expect("the third child printed its PTX hashes")
        .split(' ')
        .collect();
    assert!(
        third.iter().all(|h| h.ends_with('c')),
        "the third process compiled instead of reading the cache: {third:?}"
    );
    hashes.extend(third.iter().map(|h| h.to_string()));
    let hashes: Vec<&str> = hashes.iter().map(|h| &h[..h.len() - 1]).collect();
    assert!(hashes.iter().all(|h| h == &hashes[0]), "{hashes:?}");
    // One entry, complete and valid for `compile`'s cache lookup, holding that PTX; no
    // temporary left.
    let entries: Vec<PathBuf> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let ptx = nvrtc::cache_load(&entries[0]).expect("the cache entry is complete and valid");
    assert_eq!(format!("{:x}", Sha256::digest(ptx.as_bytes())), hashes[0]);
}

#[test]
fn threads_storing_and_loading_one_cache_entry_never_see_a_torn_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("entry.ptx");
    // Two versions of an entry (a recompile may differ in comments): readers see one or the
    // other, complete, or nothing before the first store.
    let a = format!(
        ".version 8.0\n.visible .entry k(){{}}\n{}",
        "// a\n".repeat(20_000)
    );
    let b = format!(
        ".version 8.0\n.visible .entry k(){{}}\n{}",
        "// b\n".repeat(30_000)
    );
    // Stored once before the readers start: from then on every load must find a complete
    // entry. A reader that finds none saw the entry missing or torn (a writer that truncates
    // and rewrites in place), which the checksum turns into `None`: that is the failure.
    nvrtc::cache_store(&path, &a).unwrap();
    let loads = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for w in 0..4 {
            let (path, text) = (&path, if w % 2 == 0 { &a } else { &b });
            s.spawn(move || {
                for _ in 0..25 {
                    nvrtc::cache_store(path, text).unwrap();
                }
            });
        }
        for _ in 0..2 {
            let (path, a, b, loads) = (&path, &a, &b, &loads);
            s.spawn(move || {
                for i in 0..200 {
                    let text = nvrtc::cache_load(path).unwrap_or_else(|| {
                        panic!("load {i}: the entry was missing or torn while being rewritten")
                    });
                    assert!(text == *a || text == *b, "a mixed cache entry was read");
                    loads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    assert_eq!(loads.into_inner(), 400);
    let text = nvrtc::cache_load(&path).unwrap();
    assert!(text == a || text == b);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

// ---------------------------------------------------------------------------------------
// Thread safety
// ---------------------------------------------------------------------------------------

fn assert_send_sync<T: Send + Sync + ?Sized>() {}

#[test]
fn documented_types_are_send_and_sync() {
    assert_send_sync::<MuloOptimizer>();
    assert_send_sync::<PlanCache>();
    assert_send_sync::<mulo::backend::PerTensorBackend>();
    assert_send_sync::<dyn mulo::backend::ModelBackend>();
    assert_send_sync::<dyn mulo::backend::BackendFactory>();
    assert_send_sync::<dyn mulo::backend::TensorStepper>();
    #[cfg(feature = "cuda")]
    assert_send_sync::<mulo::backend::cuda::runtime::CudaRuntime>();
    assert_send_sync::<LearnedOptimizer>();
    assert_send_sync::<mulo::ir::StepIr>();
}

/// Runs steps `from..to` of the deterministic run; returns the checkpoint hash.
fn run(opt: &mut MuloOptimizer, to: u64) -> [u8; 32] {
    while opt.step_count() < to {
        advance(opt);
    }
    sha(&opt.checkpoint_bytes().unwrap())
}

#[test]
fn optimizers_step_on_several_threads_and_move_between_them() {
    let lopt = Arc::new(fixture_lopt());
    let mut single = small_optimizer(&lopt);
    let want = run(&mut single, 6);

    // Four optimizers built and stepped on four threads at once.
    let got: Vec<[u8; 32]> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let lopt = lopt.clone();
                s.spawn(move || run(&mut small_optimizer(&lopt), 6))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(got.iter().all(|h| *h == want));

    // One optimizer moved to another thread half-way.
    let mut opt = small_optimizer(&lopt);
    run(&mut opt, 3);
    let moved = std::thread::spawn(move || {
        let h = run(&mut opt, 6);
        (opt, h)
    });
    let (opt, h) = moved.join().unwrap();
    assert_eq!(h, want);
    assert_eq!(opt.step_count(), 6);
}

#[test]
fn readers_see_whole_steps_while_another_thread_steps() {
    let lopt = fixture_lopt();
    let mut reference = small_optimizer(&lopt);
    let hashes: Vec<[u8; 32]> = (0..=8).map(|k| run(&mut reference, k)).collect();
    let shared = Arc::new(RwLock::new(small_optimizer(&lopt)));
    std::thread::scope(|s| {
        let writer = shared.clone();
        s.spawn(move || {
            for _ in 0..8 {
                advance(&mut writer.write().unwrap());
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        for _ in 0..3 {
            let reader = shared.clone();
            let hashes = &hashes;
            s.spawn(move || {
                let started = Instant::now();
                loop {
                    let opt = reader.read().unwrap();
                    let k = opt.step_count() as usize;
                    let h = sha(&opt.checkpoint_bytes().unwrap());
                    assert_eq!(h, hashes[k], "a reader saw a partial step {k}");
                    if k == 8 || started.elapsed() > Duration::from_secs(60) {
                        break;
                    }
                }
            });
        }
    });
    assert_eq!(shared.read().unwrap().step_count(), 8);
}

#[test]
fn one_plan_cache_serves_several_threads() {
    let lopt = Arc::new(fixture_lopt());
    let cache = Arc::new(Mutex::new(PlanCache::new()));
    let shapes: Vec<mulo::shape::Shape> = ["8x4", "16", "3x5x2"]
        .iter()
        .map(|s| mulo::shape::Shape::parse(s).unwrap())
        .collect();
    let plans: Vec<Vec<Arc<mulo::ir::StepIr>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let (cache, lopt, shapes) = (cache.clone(), lopt.clone(), &shapes);
                s.spawn(move || {
                    // Each thread asks in a different order.
                    (0..shapes.len())
                        .map(|i| {
                            let shape = &shapes[(i + t) % shapes.len()];
                            let layout = mulo::shape::Layout::new(shape.clone());
                            let ir = cache.lock().unwrap().get(&lopt, &layout).unwrap();
                            // The program is used outside the lock, concurrently.
                            assert_eq!(ir.layout.shape(), shape);
                            (shape.clone(), ir)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                let mut v = h.join().unwrap();
                v.sort_by_key(|(s, _)| s.to_string());
                v.into_iter().map(|(_, ir)| ir).collect()
            })
            .collect()
    });
    assert_eq!(
        cache.lock().unwrap().compiled(),
        3,
        "each shape compiled once"
    );
    for p in &plans[1..] {
        for (a, b) in p.iter().zip(&plans[0]) {
            assert!(
                Arc::ptr_eq(a, b),
                "threads got different programs for one shape"
            );
        }
    }
}
