//! Trains a small MLP (2 → 32 → 3, ReLU, softmax cross-entropy) on a synthetic three-class
//! Gaussian-blobs task with [`MuloOptimizer`] on the CPU (the default native CPU backend),
//! printing loss, accuracy and optimizer step time per epoch.
//!
//! ```sh
//! cargo run --example train_mlp                      # bundled demo meta-network
//! cargo run --example train_mlp -- --weights btherien/mulo --lr 1
//! cargo run --example train_mlp -- --epochs 30 --lr 2 --weight-decay 0.01
//! ```
//!
//! The learned step carries `step_mult = 0.01` itself, so `lr` is a multiplier around 1 (PyLO's
//! default is 1.0). The demo meta-network's rule is `P ← P − lr·0.01·f̂_7` (an Adam-like
//! normalized momentum, see `mulo::lopt::demo`).
//!
//! Forward and backward passes are written by hand in f32; the test `tests/examples.rs`
//! runs [`train`] and checks that the loss falls.

use mulo::lopt::LearnedOptimizer;
use mulo::optimizer::{MuloOptimizer, OptimizerOptions, ParamSpec};
use std::time::Instant;

/// Hidden width.
pub const HIDDEN: usize = 32;
/// Input features.
pub const INPUTS: usize = 2;
/// Classes.
pub const CLASSES: usize = 3;

/// What to train.
#[derive(Clone, Debug)]
pub struct Config {
    /// Passes over the data.
    pub epochs: usize,
    /// Examples per step.
    pub batch: usize,
    /// Training examples.
    pub samples: usize,
    /// Peak learning rate (cosine-decayed to a tenth over the run).
    pub lr: f32,
    /// Weight decay.
    pub weight_decay: f32,
    /// Seed of the data and the initialization.
    pub seed: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            epochs: 15,
            batch: 50,
            samples: 600,
            lr: 0.5,
            weight_decay: 0.0,
            seed: 7,
        }
    }
}

/// One line of the loss curve: the metrics on the whole training set after `epoch` epochs.
#[derive(Clone, Debug)]
pub struct EpochStats {
    /// Epochs done (0: before training).
    pub epoch: usize,
    /// Mean cross-entropy.
    pub loss: f32,
    /// Fraction classified correctly.
    pub accuracy: f32,
    /// Mean wall time of one optimizer step in this epoch (0 before training).
    pub step_ms: f64,
    /// Tensors skipped for non-finite gradients in this epoch.
    pub skipped: usize,
}

struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u1, u2) = (self.uniform().max(1e-7), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
}

/// Three Gaussian blobs (σ = 1) centred on a circle of radius 2: `(x, label)` pairs.
pub fn blobs(samples: usize, seed: u64) -> Vec<([f32; INPUTS], usize)> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    (0..samples)
        .map(|i| {
            let label = i % CLASSES;
            let angle = std::f32::consts::TAU * label as f32 / CLASSES as f32;
            let x = [
                2.0 * angle.cos() + rng.normal(),
                2.0 * angle.sin() + rng.normal(),
            ];
            (x, label)
        })
        .collect()
}

/// The MLP's parameters, in the optimizer's order: w1 `[32, 2]`, b1 `[32]`, w2 `[3, 32]`, b2 `[3]`.
pub struct Mlp {
    /// The four tensors.
    pub tensors: [Vec<f32>; 4],
}

impl Mlp {
    /// He-style random initialization.
    pub fn new(seed: u64) -> Self {
        let mut rng = Rng(seed.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1);
        let mut init = |n: usize, fan_in: usize| -> Vec<f32> {
            let s = (2.0 / fan_in as f32).sqrt();
            (0..n).map(|_| rng.normal() * s).collect()
        };
        Mlp {
            tensors: [
                init(HIDDEN * INPUTS, INPUTS),
                vec![0.0; HIDDEN],
                init(CLASSES * HIDDEN, HIDDEN),
                vec![0.0; CLASSES],
            ],
        }
    }

    /// The optimizer's parameter list.
    pub fn specs() -> Vec<ParamSpec> {
        let shapes: [(&str, &[usize]); 4] = [
            ("w1", &[HIDDEN, INPUTS]),
            ("b1", &[HIDDEN]),
            ("w2", &[CLASSES, HIDDEN]),
            ("b2", &[CLASSES]),
        ];
        shapes
            .iter()
            .map(|(name, dims)| ParamSpec::new(*name, dims).expect("valid shape"))
            .collect()
    }

    /// Mean loss and number correct over `data`; with `grads`, accumulates the gradient of
    /// the mean loss into it.
    pub fn loss(
        &self,
        data: &[([f32; INPUTS], usize)],
        mut grads: Option<&mut [Vec<f32>; 4]>,
    ) -> (f32, usize) {
        let [w1, b1, w2, b2] = &self.tensors;
        let scale = 1.0 / data.len() as f32;
        let (mut total, mut correct) = (0f32, 0usize);
        for (x, label) in data {
            let mut h = [0f32; HIDDEN];
            for j in 0..HIDDEN {
                let z = b1[j] + w1[j * INPUTS] * x[0] + w1[j * INPUTS + 1] * x[1];
                h[j] = z.max(0.0);
            }
            let mut logits = [0f32; CLASSES];
            for (k, logit) in logits.iter_mut().enumerate() {
                *logit = b2[k] + (0..HIDDEN).map(|j| w2[k * HIDDEN + j] * h[j]).sum::<f32>();
            }
            let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
            let sum: f32 = exps.iter().sum();
            total += -(exps[*label] / sum).ln();
            let predicted = (0..CLASSES)
                .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
                .unwrap();
            correct += usize::from(predicted == *label);
            if let Some(g) = grads.as_deref_mut() {
                // d loss / d logits = softmax − one_hot, averaged over the batch.
                let mut dlogits = [0f32; CLASSES];
                for k in 0..CLASSES {
                    dlogits[k] = (exps[k] / sum - f32::from(k == *label)) * scale;
                }
                let mut dh = [0f32; HIDDEN];
                for k in 0..CLASSES {
                    g[3][k] += dlogits[k];
                    for j in 0..HIDDEN {
                        g[2][k * HIDDEN + j] += dlogits[k] * h[j];
                        dh[j] += dlogits[k] * w2[k * HIDDEN + j];
                    }
                }
                for j in 0..HIDDEN {
                    if h[j] > 0.0 {
                        g[1][j] += dh[j];
                        g[0][j * INPUTS] += dh[j] * x[0];
                        g[0][j * INPUTS + 1] += dh[j] * x[1];
                    }
                }
            }
        }
        (total * scale, correct)
    }
}

/// Trains and returns the loss curve (entry 0 is before training); `log` sees every entry
/// as it is made.
pub fn train(
    lopt: &LearnedOptimizer,
    config: &Config,
    mut log: impl FnMut(&EpochStats),
) -> mulo::Result<Vec<EpochStats>> {
    let data = blobs(config.samples, config.seed);
    let mut model = Mlp::new(config.seed);
    let mut opt = MuloOptimizer::new(lopt, Mlp::specs(), OptimizerOptions::default())?;
    let steps_per_epoch = data.len().div_ceil(config.batch);
    let total_steps = (config.epochs * steps_per_epoch).max(1);
    let evaluate = |model: &Mlp, epoch, step_ms, skipped| {
        let (loss, correct) = model.loss(&data, None);
        EpochStats {
            epoch,
            loss,
            accuracy: correct as f32 / data.len() as f32,
            step_ms,
            skipped,
        }
    };
    let mut curve = vec![evaluate(&model, 0, 0.0, 0)];
    log(&curve[0]);
    for epoch in 1..=config.epochs {
        let (mut step_time, mut skipped) = (0f64, 0usize);
        for batch in data.chunks(config.batch) {
            let mut grads = model.tensors.clone().map(|t| vec![0f32; t.len()]);
            model.loss(batch, Some(&mut grads));
            // Cosine decay from lr to lr / 10: the schedule is just the lr given per step.
            let progress = opt.step_count() as f32 / total_steps as f32;
            let lr =
                config.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f32::consts::PI * progress).cos()));
            let [p0, p1, p2, p3] = &mut model.tensors;
            let grad_refs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
            let started = Instant::now();
            let report = opt.step(
                &mut [p0.as_mut_slice(), p1, p2, p3],
                &grad_refs,
                lr,
                config.weight_decay,
            )?;
            step_time += started.elapsed().as_secs_f64();
            skipped += report.skipped.len();
        }
        let stats = evaluate(
            &model,
            epoch,
            step_time * 1e3 / steps_per_epoch as f64,
            skipped,
        );
        log(&stats);
        curve.push(stats);
    }
    Ok(curve)
}

/// `--weights W --epochs N --lr X --weight-decay X --seed N` from the command line.
pub fn parse_args() -> Result<(Option<String>, Config), String> {
    let mut config = Config::default();
    let mut weights = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        let bad = |v: &str| format!("{arg}: `{v}` is not a valid value");
        match arg.as_str() {
            "--weights" => weights = Some(value()?),
            "--epochs" => {
                let v = value()?;
                config.epochs = v.parse().map_err(|_| bad(&v))?;
            }
            "--lr" => {
                let v = value()?;
                config.lr = v.parse().map_err(|_| bad(&v))?;
            }
            "--weight-decay" => {
                let v = value()?;
                config.weight_decay = v.parse().map_err(|_| bad(&v))?;
            }
            "--seed" => {
                let v = value()?;
                config.seed = v.parse().map_err(|_| bad(&v))?;
            }
            other => {
                return Err(format!(
                    "unknown argument `{other}`; use --weights W, --epochs N, --lr X, \
                     --weight-decay X, --seed N"
                ))
            }
        }
    }
    Ok((weights, config))
}

fn main() {
    let run = || -> Result<(), String> {
        let (weights, config) = parse_args()?;
        let lopt = match &weights {
            Some(w) => LearnedOptimizer::load(w).map_err(|e| e.to_string())?,
            None => LearnedOptimizer::demo(),
        };
        println!("learned optimizer: {}", lopt.origin);
        println!(
            "MLP {INPUTS}→{HIDDEN}→{CLASSES} on {} blob samples, batch {}, lr {} (cosine to lr/10), weight decay {}",
            config.samples, config.batch, config.lr, config.weight_decay
        );
        println!("epoch   loss    accuracy  step time");
        let curve = train(&lopt, &config, |s| {
            println!(
                "{:>5}  {:.4}   {:>6.1}%   {:.3} ms{}",
                s.epoch,
                s.loss,
                100.0 * s.accuracy,
                s.step_ms,
                if s.skipped > 0 {
                    format!("  ({} tensors skipped: non-finite gradient)", s.skipped)
                } else {
                    String::new()
                }
            )
        })
        .map_err(|e| e.to_string())?;
        let (first, last) = (&curve[0], curve.last().unwrap());
        println!(
            "loss {:.4} → {:.4} ({:.0}% of the initial loss), accuracy {:.1}%",
            first.loss,
            last.loss,
            100.0 * last.loss / first.loss,
            100.0 * last.accuracy
        );
        Ok(())
    };
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}
