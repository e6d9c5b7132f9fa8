//! `mulo-compile`: compile μLO_M optimizer steps for concrete tensor shapes, and check them
//! against trajectories recorded from PyLO.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use mulo::backend::cuda::nvrtc::Level;
use mulo::backend::interp::InterpStepper;
use mulo::backend::TensorStepper;
use mulo::lopt::{LearnedOptimizer, Rule};
use mulo::shape::{FactoredAxes, Layout, Shape};
use mulo::trajectory::{replay, Trajectory, DEFAULT_TOLERANCE};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Compile the μLO_M learned optimizer into optimizer-step programs for one tensor shape.
///
/// Compile form (no subcommand): `mulo-compile --shape 1024x512 --target cuda`.
///
/// Weights: `--weights` takes a directory in the Hub layout (model.safetensors + config.json),
/// a .safetensors file, or a Hub key owner/name looked up in the local Hugging Face cache
/// ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub) and downloaded into it
/// from $HF_ENDPOINT (else huggingface.co) when it is not there, unless --offline or
/// $HF_HUB_OFFLINE. Without it, btherien/mulo the same way, else the bundled DEMO network (not
/// the trained μLO_M) with a warning saying why.
#[derive(Parser, Debug)]
#[command(name = "mulo-compile", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    compile: CompileArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Replay trajectories recorded from PyLO and report the worst error relative to the
    /// displacement; exits with status 1 if any case is over the tolerance.
    Replay(ReplayArgs),
    /// Time steps of one shape on a backend and print, as the last line, one JSON object with
    /// shape, target, steps, median_ns, ns_per_element and the fraction of the roofline reached.
    Bench(BenchArgs),
    /// Write the bundled demo meta-network in the Hub layout (model.safetensors + config.json).
    DemoWeights {
        /// Directory to write into.
        #[arg(short, long, default_value = "mulo-demo-weights")]
        output: PathBuf,
    },
}

/// Where the learned optimizer comes from.
#[derive(Args, Debug, Clone)]
struct WeightsArgs {
    /// Weights: a Hub-layout directory, a .safetensors file, or a Hub key owner/name (the local
    /// Hugging Face cache, then the Hub). Default: btherien/mulo the same way, else the bundled
    /// demo.
    #[arg(long, value_name = "W")]
    weights: Option<String>,
    /// The Hub revision (branch, tag or commit hash) of a Hub key.
    #[arg(long, value_name = "REV", default_value = mulo::lopt::DEFAULT_REVISION)]
    revision: String,
    /// Never download: Hub keys come from the local cache only (as HF_HUB_OFFLINE=1 does).
    #[arg(long)]
    offline: bool,
    /// JSON file overriding meta-parameters (exp_mult, step_mult, momentum_decays, rms_decay,
    /// adafactor_decays, rule); fields left out keep μLO_M's values, so with `--lopt elo` the
    /// file must say `"rule": "elo"`.
    #[arg(long, value_name = "FILE")]
    meta: Option<PathBuf>,
    /// Which learned optimizer's step: `mulo` (μLO_M/AdafacLO) or `elo` (PyLO's ELO_naive:
    /// raw decays, nan_to_num gradients, p ← p − lr·(d·exp(exp_mult·m) + wd·p)). Without
    /// --weights, its Hub weights (btherien/mulo or DiamondXL/elo) from the local cache.
    #[arg(long, value_name = "RULE", default_value = "mulo")]
    lopt: Rule,
}

impl WeightsArgs {
    fn load(&self) -> Result<LearnedOptimizer> {
        let lopt = self.load_weights()?.with_rule(self.lopt);
        let lopt = match &self.meta {
            Some(path) => lopt.with_meta_file(path)?,
            None => lopt,
        };
        if lopt.rule() != self.lopt {
            return Err(mulo::Error::argument(
                "--meta",
                format!(
                    "the meta-parameter file gives rule `{}` but --lopt is `{}`",
                    lopt.rule(),
                    self.lopt
                ),
            )
            .into());
        }
        eprintln!("weights: {} (rule {})", lopt.origin, lopt.rule());
        Ok(lopt)
    }

    /// The cache, then the Hub (with the `hub` feature); for the default key (the rule's:
    /// btherien/mulo or DiamondXL/elo), the demo network when neither has it.
    fn load_weights(&self) -> Result<LearnedOptimizer> {
        let key = self.lopt.hub_key();
        let offline = self.offline || mulo::lopt::hub_offline_from_env();
        Ok(match &self.weights {
            Some(spec) => LearnedOptimizer::load_or_download(spec, &self.revision, offline)?,
            None => {
                LearnedOptimizer::from_hub(key, &self.revision, offline).unwrap_or_else(|why| {
                    let build = if cfg!(feature = "hub") {
                        ""
                    } else {
                        " (built without the `hub` feature: never downloads)"
                    };
                    eprintln!(
                        "warning: using the bundled DEMO network, not the trained {key}{build}: \
                         {why}"
                    );
                    LearnedOptimizer::demo()
                })
            }
        })
    }
}

/// What the compile form produces.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum CompileTarget {
    /// The step IR's text form, on standard output (or into -o FILE).
    Ir,
    /// An ONNX graph of one step (mulo_step.onnx).
    Onnx,
    /// CUDA C JIT-compiled with NVRTC (mulo_step.cu, .ptx, .json).
    Cuda,
}

#[derive(Args, Debug)]
struct CompileArgs {
    /// Tensor shape: 1024x512, 768, 16x8x3x3, or `scalar`. Repeat it (with --target cuda) for
    /// a whole model: one packed program stepping every tensor in a fixed number of launches
    /// (mulo_model.cu, .ptx, .json), tensors in the order given.
    #[arg(long, value_name = "SHAPE", allow_hyphen_values = true)]
    shape: Vec<String>,
    /// The factored axes `D0,D1` of a tensor of rank ≥ 2 (SPEC.md §2), or `default` (the
    /// stable order). Give it once per --shape, in the same order, to reproduce a PyLO run
    /// whose host ordered tied largest axes the other way (e.g. `--shape 32x32x3x3
    /// --factored-axes 0,1`).
    #[arg(long, value_name = "D0,D1")]
    factored_axes: Vec<String>,
    /// With --target cuda: write the packed model program even for a single --shape.
    #[arg(long)]
    packed: bool,
    /// With --target cuda: one rank's **staged** packed program, for tensors split by rows of
    /// axis 0 over several ranks (FSDP's `Shard(0)`): the rows of axis 0 this rank holds of
    /// each --shape, once per --shape in order or comma-separated (`whole` for a tensor every
    /// rank steps whole, e.g. a 0-d one). Its manifest gives the stages and the round buffers to all-reduce
    /// between them (docs/cuda.md, "Staged programs").
    #[arg(long, value_name = "ROWS", value_delimiter = ',')]
    shard_rows: Vec<String>,
    /// What to produce.
    #[arg(long, value_enum, default_value = "ir")]
    target: CompileTarget,
    #[command(flatten)]
    weights: WeightsArgs,
    /// Output file (ir, onnx) or directory (cuda).
    #[arg(short, long, value_name = "OUT")]
    output: Option<PathBuf>,
    /// GPU architecture for --target cuda (default: the present GPU's, else sm_80).
    #[arg(long, value_name = "sm_XY")]
    arch: Option<String>,
    /// With --target cuda: also compile the program to a CUBIN for --arch (what the runtime
    /// loads: NVRTC runs ptxas, the driver does not JIT) and write it beside the PTX
    /// (mulo_step.cubin or mulo_model.cubin); reports NVRTC's and ptxas's times apart.
    #[arg(long)]
    cubin: bool,
    /// With --cubin: also print ptxas's resource report of that CUBIN to stdout (registers,
    /// spills and stack frame per function, as `ptxas -v` prints them): NVRTC compiles it once
    /// more, uncached, with the same options plus `--ptxas-options=-v`, which changes no code
    /// (`.ci/steps/ptxas.sh` reads this).
    #[arg(long, requires = "cubin")]
    ptxas_report: bool,
}

/// Backends that can execute steps.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum RunTarget {
    /// The reference interpreter (f32).
    Interp,
    /// CUDA on GPU 0 (NVRTC-compiled for its architecture).
    Cuda,
    /// The exported ONNX graph, run on the CPU by tract.
    Onnx,
    /// The step rendered as a statistics graph and per-chunk graphs, run by tract on 2 threads
    /// (the whole graph where axis 0 has a single row).
    OnnxChunked,
    /// The native CPU backend: chunk programs rendered from the IR, on every core.
    Cpu,
}

#[derive(Args, Debug)]
struct ReplayArgs {
    /// Backend to replay through.
    #[arg(long, value_enum, default_value = "interp")]
    target: RunTarget,
    #[command(flatten)]
    weights: WeightsArgs,
    /// Tolerance on max |p − p_ref| / max |pT − p0| (and on the final state, relative to its size).
    #[arg(long, default_value_t = DEFAULT_TOLERANCE)]
    tol: f64,
    /// Trajectory files (safetensors, the golden format).
    #[arg(required = true, value_name = "CASE.safetensors")]
    cases: Vec<PathBuf>,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Tensor shape: 1024x512, 768, 16x8x3x3, or `scalar`. With --target cuda, repeat it to
    /// time a packed whole-model step of all the shapes given (device-resident parameters and
    /// gradients).
    #[arg(
        long,
        value_name = "SHAPE",
        allow_hyphen_values = true,
        required = true
    )]
    shape: Vec<String>,
    /// The factored axes `D0,D1` (SPEC.md §2); default: the stable order.
    #[arg(long, value_name = "D0,D1")]
    factored_axes: Option<String>,
    /// Backend to time.
    #[arg(long, value_enum, default_value = "interp")]
    target: RunTarget,
    #[command(flatten)]
    weights: WeightsArgs,
    /// Timed steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Peak multiply-adds per second of the machine, for the compute floor (default: the
    /// 150 G/s of the 2-core CI machine; set your own).
    #[arg(long, default_value_t = 150e9)]
    peak_madds: f64,
    /// Memory bandwidth in bytes per second, for the memory floor (0: not modelled).
    #[arg(long, default_value_t = 0.0)]
    bandwidth: f64,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Replay(args)) => run_replay(&args),
        Some(Command::Bench(args)) => run_bench(&args),
        Some(Command::DemoWeights { output }) => write_demo(&output),
        None => run_compile(&cli.compile),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            std::process::exit(2);
        }
    }
}

/// The error and its causes, each cause printed unless the text before already holds it (mulo's
/// errors carry their source's text and keep the source too).
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
    }
    text
}

fn run_compile(args: &CompileArgs) -> Result<i32> {
    if args.shape.is_empty() {
        bail!(
            "--shape is required (e.g. `mulo-compile --shape 1024x512 --target cuda`); see --help"
        );
    }
    if !args.factored_axes.is_empty() && args.factored_axes.len() != args.shape.len() {
        bail!(
            "{} --factored-axes for {} --shape: give one per --shape, in order (`default` for the stable order)",
            args.factored_axes.len(),
            args.shape.len()
        );
    }
    if args.cubin && args.target != CompileTarget::Cuda {
        bail!("--cubin needs --target cuda");
    }
    if !args.shard_rows.is_empty() && args.shard_rows.len() != args.shape.len() {
        bail!(
            "{} --shard-rows for {} --shape: give one per --shape, in order (`whole` for a tensor stepped whole)",
            args.shard_rows.len(),
            args.shape.len()
        );
    }
    let layouts = args
        .shape
        .iter()
        .enumerate()
        .map(|(i, s)| layout_arg(s, args.factored_axes.get(i).map(String::as_str)))
        .collect::<Result<Vec<_>>>()?;
    if layouts.len() > 1 || args.packed || !args.shard_rows.is_empty() {
        if args.target != CompileTarget::Cuda {
            bail!(
                "several --shape values (or --packed, --shard-rows) make a packed whole-model program, which only --target cuda produces; compile one shape at a time for --target {}",
                match args.target {
                    CompileTarget::Ir => "ir",
                    CompileTarget::Onnx => "onnx",
                    CompileTarget::Cuda => "cuda",
                }
            );
        }
        return compile_packed(args, &layouts);
    }
    let lopt = args.weights.load()?;
    let started = Instant::now();
    let ir = mulo::compile_layout(&layouts[0], &lopt)?;
    match args.target {
        CompileTarget::Ir => {
            let text = ir.to_text();
            match &args.output {
                Some(path) => {
                    mulo::fsio::write_atomic(path, text.as_bytes())?;
                    eprintln!(
                        "wrote {} ({} nodes) in {:.1?}",
                        path.display(),
                        ir.nodes.len(),
                        started.elapsed()
                    );
                }
                None => print!("{text}"),
            }
        }
        CompileTarget::Cuda => {
            let arch = args
                .arch
                .clone()
                .unwrap_or_else(mulo::backend::cuda::nvrtc::default_arch);
            let compiled = mulo::backend::cuda::compile(&ir, &arch, true)?;
            let dir = args.output.clone().unwrap_or_else(|| PathBuf::from("."));
            for path in compiled.write_to(&dir)? {
                eprintln!("wrote {}", path.display());
            }
            eprintln!(
                "{} kernels, {} passes over the elements, {} bytes of PTX for {} (NVRTC {}{}) in {:.1?}",
                compiled.manifest.kernels.len(),
                compiled.manifest.elem_passes,
                compiled.ptx.ptx.len(),
                arch,
                compiled.manifest.nvrtc_version,
                if compiled.ptx.from_cache { ", from the cache" } else { "" },
                started.elapsed()
            );
            if args.cubin {
                write_cubin(
                    &compiled.source,
                    &arch,
                    Level::Fast,
                    &dir.join("mulo_step.cubin"),
                    args.ptxas_report,
                )?;
            }
        }
        CompileTarget::Onnx => write_onnx(&ir, args.output.clone(), started)?,
    }
    Ok(0)
}

/// `--target onnx`: writes the graph.
#[cfg(feature = "onnx")]
fn write_onnx(ir: &mulo::ir::StepIr, output: Option<PathBuf>, started: Instant) -> Result<()> {
    let path = output.unwrap_or_else(|| PathBuf::from(mulo::backend::onnx::DEFAULT_FILE_NAME));
    let bytes = mulo::backend::onnx::export(ir)?;
    mulo::fsio::write_atomic(&path, &bytes)?;
    eprintln!(
        "wrote {} ({} bytes, opset {}) in {:.1?}",
        path.display(),
        bytes.len(),
        mulo::backend::onnx::OPSET,
        started.elapsed()
    );
    Ok(())
}

#[cfg(not(feature = "onnx"))]
fn write_onnx(_: &mulo::ir::StepIr, _: Option<PathBuf>, _: Instant) -> Result<()> {
    bail!(NO_ONNX)
}

#[cfg(not(feature = "onnx"))]
const NO_ONNX: &str =
    "this mulo-compile was built without the `onnx` feature: rebuild with default features";

/// A stepper on tract: the whole graph, or the chunked runtime.
#[cfg(feature = "onnx")]
fn onnx_stepper(ir: &mulo::ir::StepIr, chunked: bool) -> Result<Box<dyn TensorStepper>> {
    use mulo::backend::onnx::{chunked::DEFAULT_CHUNK_ELEMENTS, ChunkedOnnxStepper, OnnxStepper};
    // One row on axis 0: nothing to chunk.
    Ok(if chunked && ChunkedOnnxStepper::supports(&ir.layout) {
        Box::new(ChunkedOnnxStepper::new(ir, 0, DEFAULT_CHUNK_ELEMENTS, 2)?)
    } else {
        Box::new(OnnxStepper::new(ir, 0)?)
    })
}

#[cfg(not(feature = "onnx"))]
fn onnx_stepper(_: &mulo::ir::StepIr, _: bool) -> Result<Box<dyn TensorStepper>> {
    bail!(NO_ONNX)
}

/// The layout of `--shape SHAPE` with its `--factored-axes` (absent or `default`: the stable
/// order), the error naming the argument at fault.
fn layout_arg(shape: &str, axes: Option<&str>) -> Result<Layout> {
    let parsed = Shape::parse(shape).with_context(|| format!("--shape {shape}"))?;
    let axes = match axes.map(str::trim) {
        None | Some("default") => None,
        Some(text) => Some(
            text.parse::<FactoredAxes>()
                .with_context(|| format!("--factored-axes {text}"))?,
        ),
    };
    Layout::with_axes(parsed, axes).with_context(|| {
        format!(
            "--shape {shape} --factored-axes {}",
            axes.map_or("default".to_string(), |a| a.to_string())
        )
    })
}

/// `--target cuda` with several shapes: the packed model program.
fn compile_packed(args: &CompileArgs, layouts: &[Layout]) -> Result<i32> {
    use mulo::backend::cuda::{nvrtc, packed::PackedModel};
    let lopt = args.weights.load()?;
    let arch = args.arch.clone().unwrap_or_else(nvrtc::default_arch);
    nvrtc::check_arch(&arch)?;
    let started = Instant::now();
    let model = if args.shard_rows.is_empty() {
        PackedModel::new(&lopt, layouts)?
    } else {
        let tensors = layouts
            .iter()
            .zip(&args.shard_rows)
            .enumerate()
            .map(|(i, (layout, rows))| {
                let rows = match rows.trim() {
                    "whole" => None,
                    r => Some(r.parse::<usize>().map_err(|_| {
                        anyhow::anyhow!(
                            "--shard-rows {rows:?} (for --shape {}, number {}): expected a row count or `whole`",
                            layout.shape(),
                            i + 1
                        )
                    })?),
                };
                Ok((layout.clone(), rows))
            })
            .collect::<Result<Vec<_>>>()?;
        PackedModel::staged(&lopt, &tensors)?
    };
    eprintln!(
        "packing {} tensors of {} distinct shapes; compiling for {arch} (NVRTC runs the first time only; the result is cached)",
        model.tensors.len(),
        model.plans.len()
    );
    let compiled = model.compile(&arch, true)?;
    let dir = args.output.clone().unwrap_or_else(|| PathBuf::from("."));
    for path in compiled.write_to(&dir)? {
        eprintln!("wrote {}", path.display());
    }
    if model.stages() > 1 {
        eprintln!(
            "staged: {} stages; all-reduce (sum, f64) the round buffers between them: {} values",
            model.stages(),
            model
                .round_len
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(" + ")
        );
    }
    eprintln!(
        "{} launches per step, {} bytes of PTX (NVRTC {}{}) in {:.1?}",
        compiled.manifest.slots.len(),
        compiled.ptx.ptx.len(),
        compiled.manifest.nvrtc_version,
        if compiled.ptx.from_cache {
            ", from the cache"
        } else {
            ""
        },
        started.elapsed()
    );
    if args.cubin {
        write_cubin(
            &compiled.source,
            &arch,
            Level::Full,
            &dir.join("mulo_model.cubin"),
            args.ptxas_report,
        )?;
    }
    Ok(0)
}

/// `--cubin`: compiles `source` to a CUBIN for `arch` at `level` (the runtime's:
/// [`Level::Fast`] for one tensor, [`Level::Full`] for a model; through the disk cache), writes
/// it to `path`, and prints where the time went: NVRTC's own phases (its `--time` report) when
/// it ran, the whole call's time either way (`bench/cuda_compile_time.sh` reads this line).
/// With `ptxas_report` (`--ptxas-report`), then prints ptxas's resource report of that CUBIN
/// on standard output.
fn write_cubin(
    source: &str,
    arch: &str,
    level: Level,
    path: &Path,
    ptxas_report: bool,
) -> Result<()> {
    use mulo::backend::cuda::nvrtc;
    let started = Instant::now();
    let cubin = nvrtc::compile_cubin_timed(source, arch, level, true)?;
    let elapsed = started.elapsed();
    mulo::fsio::write_atomic(path, &cubin.cubin)?;
    eprintln!("wrote {}", path.display());
    let ms = |phase: &str| {
        cubin
            .phase_ms(phase)
            .map_or("-".to_string(), |v| format!("{v:.0}"))
    };
    eprintln!(
        "cubin: {} bytes for {arch}; {} in {:.1} ms; NVRTC front end {} ms, NVVM {} ms, ptxas {} ms",
        cubin.cubin.len(),
        if cubin.from_cache {
            "from the cache"
        } else {
            "compiled"
        },
        elapsed.as_secs_f64() * 1e3,
        ms("CUDA C++ Frontend"),
        ms("NVVM Optimizer"),
        ms(nvrtc::PTXAS_PHASE),
    );
    if ptxas_report {
        print!("{}", nvrtc::cubin_ptxas_report(source, arch, level)?);
    }
    Ok(())
}

fn make_stepper(
    target: RunTarget,
    layout: &Layout,
    lopt: &LearnedOptimizer,
) -> Result<Box<dyn TensorStepper>> {
    let ir = Arc::new(mulo::compile_layout(layout, lopt)?);
    Ok(match target {
        RunTarget::Interp => Box::new(InterpStepper::new(ir, 0)),
        RunTarget::Cuda => cuda_stepper(&ir)?,
        RunTarget::Onnx => onnx_stepper(&ir, false)?,
        RunTarget::Cpu => Box::new(mulo::backend::cpu::CpuStepper::new(ir, 0)),
        RunTarget::OnnxChunked => onnx_stepper(&ir, true)?,
    })
}

fn run_replay(args: &ReplayArgs) -> Result<i32> {
    let lopt = args.weights.load()?;
    let mut failed = 0;
    println!(
        "{:<24} {:>6} {:>12} {:>12}  result",
        "case", "steps", "param err", "state err"
    );
    for path in &args.cases {
        let traj = Trajectory::load(path)?;
        // Refused rather than followed: the weights were chosen for --lopt, and a μLO_M
        // replay of an ELO file (or the reverse) is meaningless.
        if traj.rule != lopt.rule() {
            return Err(mulo::Error::argument(
                "--lopt",
                format!(
                    "{} records lopt `{}` but the replay runs `{}`: pass --lopt {}",
                    path.display(),
                    traj.rule,
                    lopt.rule(),
                    traj.rule
                ),
            )
            .into());
        }
        check_host_memory(
            &format!("{}: shape {}", path.display(), traj.layout.shape()),
            &traj.layout,
        )?;
        let mut stepper = make_stepper(args.target, &traj.layout, &lopt)?;
        let started = Instant::now();
        let report = replay(stepper.as_mut(), &traj)?;
        let state_err = report.state_errors.iter().map(|e| e.1).fold(0f64, f64::max);
        let ok = report.worst() <= args.tol;
        if !ok {
            failed += 1;
        }
        println!(
            "{:<24} {:>6} {:>12.3e} {:>12.3e}  {} ({:.1?})",
            report.name,
            report.steps,
            report.param_error,
            state_err,
            if ok { "ok" } else { "OVER TOLERANCE" },
            started.elapsed()
        );
    }
    println!(
        "{} of {} cases within tolerance {:e} (target {:?})",
        args.cases.len() - failed,
        args.cases.len(),
        args.tol,
        args.target
    );
    Ok(if failed > 0 { 1 } else { 0 })
}

fn run_bench(args: &BenchArgs) -> Result<i32> {
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if args.shape.len() > 1 {
        if args.target != RunTarget::Cuda {
            bail!("several --shape values (a packed model step) are timed with --target cuda only");
        }
        if args.factored_axes.is_some() {
            bail!("--factored-axes applies to a single --shape");
        }
        return bench_packed_cuda(args);
    }
    let layout = layout_arg(&args.shape[0], args.factored_axes.as_deref())?;
    let shape = layout.shape().clone();
    // Before the weights are loaded and the program compiled: an impossible size fails at once.
    let what = format!("--shape {}", args.shape[0]);
    if args.target != RunTarget::Cuda {
        check_host_memory(&what, &layout)?;
    }
    let lopt = args.weights.load()?;
    let ir = mulo::compile_layout(&layout, &lopt)?;
    if args.target == RunTarget::Cuda {
        return bench_cuda(&ir, args);
    }
    let n = layout.numel();
    // Deterministic, varied data: the timing must not depend on special values.
    let mut param = try_filled(&what, n, |i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3)?;
    let grad = try_filled(&what, n, |i| ((i * 104729 % 997) as f32 - 498.0) * 1e-4)?;
    let mut stepper = make_stepper(args.target, &layout, &lopt)?;
    let hyper = mulo::backend::Hyper {
        lr: 1e-3,
        weight_decay: 0.0,
    };
    eprintln!(
        "bench: {} steps of {} on {:?} after {} warm-up steps",
        args.steps, shape, args.target, args.warmup
    );
    let times = mulo::bench::time_steps(args.warmup, args.steps, || {
        stepper.step(&mut param, &grad, hyper)
    })?;
    let report = mulo::bench::BenchReport::new(
        &ir,
        &format!("{:?}", args.target).to_lowercase(),
        &times,
        args.peak_madds,
        args.bandwidth,
    );
    eprintln!(
        "median {:.3} ms per step, {:.1} ns per element; compute floor {:.1} ns per element ({:.0} folded multiply-adds), {:.1}% of the roofline",
        report.median_ns as f64 / 1e6,
        report.ns_per_element,
        report.compute_floor_ns_per_element,
        report.cost.madds_per_element,
        report.roofline_fraction * 100.0
    );
    println!("{}", report.to_json());
    Ok(0)
}

/// The host memory a CPU step of `layout` holds at once, in bytes: the parameter, the
/// gradient, the optimizer state, and the step's new parameter and state (the interpreter
/// builds them before replacing the old ones). `None` when it does not fit in a `usize`.
fn host_bytes(layout: &Layout) -> Option<usize> {
    let state: u128 = mulo::ir::Buffer::state_for_layout(layout)
        .into_iter()
        .map(|b| b.len(layout) as u128)
        .sum();
    let floats = 3 * layout.numel() as u128 + 2 * state;
    usize::try_from(floats * 4)
        .ok()
        .filter(|&b| b <= isize::MAX as usize)
}

/// Refuses, before anything is allocated, a shape whose buffers ([`host_bytes`]) cannot be
/// held: more than the machine's memory and swap, or more than the allocator grants. `what`
/// (the argument or file that gave the shape) starts the error, which `main` turns into exit
/// status 2; an infallible allocation of that size would abort the process instead.
fn check_host_memory(what: &str, layout: &Layout) -> Result<()> {
    let shape = layout.shape();
    let refuse = |need: String, why: String| {
        anyhow!(
            "{what}: a step of shape {shape} ({} elements) needs {need} of host memory for its parameter, gradient and optimizer state; {why}",
            layout.numel()
        )
    };
    let Some(bytes) = host_bytes(layout) else {
        return Err(refuse(
            "more bytes than an address space holds".into(),
            "no machine can allocate it".into(),
        ));
    };
    let need = format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64);
    // Checked against the machine first: with overcommit the allocator may grant far more
    // than exists, and the process would be killed when the pages are touched.
    if let Some(total) = machine_memory() {
        if bytes as u128 > total {
            return Err(refuse(
                need,
                format!(
                    "this machine has {:.1} GiB of memory and swap",
                    total as f64 / (1u64 << 30) as f64
                ),
            ));
        }
    }
    let mut probe: Vec<u8> = Vec::new();
    probe
        .try_reserve_exact(bytes)
        .map_err(|e| refuse(need, format!("the allocator refused it ({e})")))?;
    Ok(())
}

/// The machine's memory and swap in bytes (Linux `sysinfo`); `None` elsewhere or on error.
fn machine_memory() -> Option<u128> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sysinfo only writes the struct it is given; zeroed is a valid value of it.
        let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
        // SAFETY: a valid pointer to a sysinfo struct.
        if unsafe { libc::sysinfo(&mut info) } != 0 {
            return None;
        }
        let unit = u128::from(info.mem_unit.max(1));
        Some((info.totalram as u128 + info.totalswap as u128) * unit)
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// `n` values `f(0..n)`, allocated fallibly: an error starting with `what` instead of an
/// abort when the memory is not there.
fn try_filled(what: &str, n: usize, f: impl Fn(usize) -> f32) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|e| anyhow!("{what}: cannot allocate {n} values of 4 bytes ({e})"))?;
    v.extend((0..n).map(f));
    Ok(v)
}

/// `bench --target cuda`: device-resident steps; floors from the measured copy bandwidth and
/// the GPU's FP32 peak.
#[cfg(feature = "cuda")]
fn bench_cuda(ir: &mulo::ir::StepIr, args: &BenchArgs) -> Result<i32> {
    let runtime = mulo::backend::cuda::runtime::CudaRuntime::new(0)?;
    let report = mulo::backend::cuda::runtime::bench(&runtime, ir, args.warmup, args.steps)?;
    eprintln!(
        "device {}: copy bandwidth {:.0} GB/s, FP32 {:.1} T multiply-adds/s (both measured)",
        runtime.arch(),
        report.bandwidth_bytes_per_sec / 1e9,
        report.peak_madds_per_sec / 1e12
    );
    eprintln!(
            "median {:.3} ms per step, {:.3} ns per element; {:.1}% of the {} B/element memory floor, {:.1}% of the FP32 floor",
            report.median_ns as f64 / 1e6,
            report.ns_per_element,
            report.memory_floor_fraction * 100.0,
            report.cost.bytes_per_element,
            report.compute_floor_fraction * 100.0
        );
    println!("{}", report.to_json());
    Ok(0)
}

#[cfg(not(feature = "cuda"))]
fn bench_cuda(_: &mulo::ir::StepIr, _: &BenchArgs) -> Result<i32> {
    bail!(mulo::backend::cuda::nvrtc::NO_CUDA)
}

/// `bench --target cuda --shape A --shape B …`: packed whole-model steps on GPU 0.
#[cfg(feature = "cuda")]
fn bench_packed_cuda(args: &BenchArgs) -> Result<i32> {
    use mulo::backend::cuda::packed_cuda::{bench_packed, PackedCuda};
    let layouts = args
        .shape
        .iter()
        .map(|s| layout_arg(s, None))
        .collect::<Result<Vec<_>>>()?;
    let lopt = args.weights.load()?;
    let packed = PackedCuda::new(0)?;
    let report = bench_packed(&packed, &lopt, &layouts, args.warmup, args.steps)?;
    eprintln!(
        "packed step of {} tensors ({} shapes, {} elements, {} launches): median {:.3} ms; {:.1}% of the memory floor ({:.3} ms), {:.1}% of the FP32 floor ({:.3} ms)",
        report.tensors,
        report.shapes,
        report.elements,
        report.launches,
        report.median_ns as f64 / 1e6,
        report.memory_floor_fraction * 100.0,
        report.memory_floor_ns / 1e6,
        report.compute_floor_fraction * 100.0,
        report.compute_floor_ns / 1e6,
    );
    println!(
        "{}",
        serde_json::to_string(&report).expect("the report serializes")
    );
    Ok(0)
}

#[cfg(not(feature = "cuda"))]
fn bench_packed_cuda(_: &BenchArgs) -> Result<i32> {
    bail!(mulo::backend::cuda::nvrtc::NO_CUDA)
}

/// A CUDA stepper for `ir` on GPU 0.
#[cfg(feature = "cuda")]
fn cuda_stepper(ir: &Arc<mulo::ir::StepIr>) -> Result<Box<dyn TensorStepper>> {
    use mulo::backend::cuda::runtime::{CudaRuntime, CudaStepper};
    let program = CudaRuntime::new(0)?.program(ir)?;
    Ok(Box::new(CudaStepper::new(program, 0)?))
}

#[cfg(not(feature = "cuda"))]
fn cuda_stepper(_: &Arc<mulo::ir::StepIr>) -> Result<Box<dyn TensorStepper>> {
    bail!(mulo::backend::cuda::nvrtc::NO_CUDA)
}

fn write_demo(output: &Path) -> Result<i32> {
    mulo::lopt::demo::demo_network().save_hub_layout(output)?;
    eprintln!(
        "wrote the DEMO meta-network (not the trained μLO_M) to {}",
        output.display()
    );
    Ok(0)
}
