//! `mulo_step.json`: everything a host needs to run `mulo_step.ptx` without mulo.

use super::render::params;
use super::schedule::{grid_dim, KernelKind, Schedule, BLOCK_DIM_X};
use crate::backend::Hyper;
use crate::error::Result;
use crate::ir::{Buffer, RuntimeScalar, StepIr};
use serde::{Deserialize, Serialize};

/// Format tag of the manifest.
pub const FORMAT: &str = "mulo-cuda-step";
/// Version of the manifest format.
/// 2: the weights' `__constant__` arrays are no longer in the PTX (`constants`).
pub const FORMAT_VERSION: u32 = 2;

/// The manifest of a compiled step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`FORMAT_VERSION`].
    pub format_version: u32,
    /// mulo's version.
    pub generator: String,
    /// The tensor shape as given (empty for a 0-d tensor).
    pub shape: Vec<usize>,
    /// The dimensions the step works on (`[1]` for a 0-d tensor).
    pub dims: Vec<usize>,
    /// Number of elements.
    pub numel: usize,
    /// The factored axes `{d0, d1}` (SPEC.md §2), or null for rank ≤ 1.
    pub factored: Option<FactoredJson>,
    /// The GPU architecture the PTX targets.
    pub arch: String,
    /// NVRTC version that produced the PTX, `major.minor`.
    pub nvrtc_version: String,
    /// The PTX's ISA version (`.version`), `major.minor`; empty before compilation.
    #[serde(default)]
    pub ptx_isa: String,
    /// The oldest driver that loads the PTX: its CUDA version and Linux driver branch, from
    /// NVIDIA's table of PTX ISA versions per CUDA release (e.g. `CUDA 12.9 (R575)`).
    #[serde(default)]
    pub min_driver: String,
    /// Fingerprint of the learned optimizer (weights and meta-parameters).
    pub lopt_fingerprint: String,
    /// The PTX file name.
    pub ptx: String,
    /// The CUDA source file name.
    pub source: String,
    /// Passes over the element data per step.
    pub elem_passes: usize,
    /// Tensors the step reads and writes, in kernel argument order.
    pub buffers: Vec<BufferJson>,
    /// Scratch arenas the host allocates once (their contents need no initialization and are
    /// meaningless between steps).
    pub scratch: Vec<ScratchJson>,
    /// Runtime scalars, in kernel argument order after the buffers and scratch.
    pub scalars: Vec<ScalarJson>,
    /// The argument list every kernel takes, in order.
    pub args: Vec<ArgJson>,
    /// Kernels, in launch order (one stream, each after the previous).
    pub kernels: Vec<KernelJson>,
    /// The `__constant__` arrays (the meta-network's weights) the PTX declares without their
    /// values: the host copies each into the loaded module before the first launch.
    pub constants: Vec<ConstantJson>,
    /// How to run a step, in words.
    pub protocol: String,
}

/// A `__constant__` array of the program that the host fills after loading the module
/// (`cuModuleGetGlobal` and a copy of `len` f32 values; CuPy: `RawModule.get_global`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConstantJson {
    /// The symbol in the PTX.
    pub name: String,
    /// What it holds.
    pub label: String,
    /// Always `f32`.
    pub dtype: String,
    /// Number of values.
    pub len: usize,
    /// The values as little-endian f32 bytes, in hex (8 digits a value; exact).
    pub hex: String,
}

impl ConstantJson {
    /// The entry of one array.
    pub fn new(a: &super::render::ConstArray) -> Self {
        let mut hex = String::with_capacity(8 * a.values.len());
        for v in &a.values {
            for b in v.to_le_bytes() {
                hex.push_str(&format!("{b:02x}"));
            }
        }
        ConstantJson {
            name: a.name.clone(),
            label: a.label.clone(),
            dtype: "f32".into(),
            len: a.values.len(),
            hex,
        }
    }

    /// The values; an error naming the array when `hex` is not `len` f32 values.
    pub fn values(&self) -> Result<Vec<f32>> {
        let bad = || {
            crate::error::Error::argument(
                "manifest",
                format!(
                    "constant `{}`: `hex` is not {} f32 values",
                    self.name, self.len
                ),
            )
        };
        if self.dtype != "f32" || self.hex.len() != 8 * self.len || !self.hex.is_ascii() {
            return Err(bad());
        }
        (0..self.len)
            .map(|i| {
                let word = &self.hex[8 * i..8 * i + 8];
                let mut bytes = [0u8; 4];
                for (k, b) in bytes.iter_mut().enumerate() {
                    *b = u8::from_str_radix(&word[2 * k..2 * k + 2], 16).map_err(|_| bad())?;
                }
                Ok(f32::from_le_bytes(bytes))
            })
            .collect()
    }
}

/// The manifest entries of a program's `__constant__` arrays.
pub fn constants_json(arrays: &[super::render::ConstArray]) -> Vec<ConstantJson> {
    arrays.iter().map(ConstantJson::new).collect()
}

/// Factored axes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FactoredJson {
    /// Largest axis (R is reduced over it).
    pub d0: usize,
    /// Second largest axis (C is reduced over it).
    pub d1: usize,
}

/// One tensor argument.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BufferJson {
    /// Canonical name (`param`, `grad`, `mom`, `rms`, `fac_row`, `fac_col`, `fac_v`).
    pub name: String,
    /// Element type (`f32`).
    pub dtype: String,
    /// Shape, decay-major: `[lanes, *domain]` for 3-lane state, the domain alone otherwise.
    pub shape: Vec<usize>,
    /// Number of values.
    pub len: usize,
    /// `read` or `read_write`.
    pub access: String,
    /// Whether it is optimizer state (kept between steps; zero before the first).
    pub state: bool,
    /// `row-major, decay-major` (the canonical layout shared with the ONNX target).
    pub layout: String,
}

/// One scratch arena.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScratchJson {
    /// Argument name.
    pub name: String,
    /// Element type (`f32` or `f64`).
    pub dtype: String,
    /// Number of values (at least 1).
    pub len: usize,
    /// Bytes.
    pub bytes: usize,
}

/// One runtime scalar.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScalarJson {
    /// Argument name.
    pub name: String,
    /// `f32`.
    pub dtype: String,
    /// What it is.
    pub meaning: String,
}

/// One kernel argument.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArgJson {
    /// Name.
    pub name: String,
    /// `buffer`, `scratch` or `scalar`.
    pub kind: String,
    /// `f32*` (device pointer to f32), `f64*`, or `f32` (by value).
    pub dtype: String,
}

/// One kernel launch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelJson {
    /// Entry name in the PTX.
    pub name: String,
    /// `elem` (a pass over the elements) or `small` (small-domain work: one block, or the
    /// points of the row/column domains spread over many).
    pub kind: String,
    /// Grid dimensions in blocks.
    pub grid: [u32; 3],
    /// Block dimensions in threads.
    pub block: [u32; 3],
    /// Dynamic shared memory (bytes).
    pub shared_mem_bytes: u32,
    /// What it does.
    pub summary: String,
}

impl BufferJson {
    /// The description of `buffer` for a tensor of `layout`.
    pub fn new(buffer: Buffer, layout: &crate::shape::Layout) -> Self {
        BufferJson {
            name: buffer.name().to_string(),
            dtype: "f32".into(),
            shape: buffer.shape(layout),
            len: buffer.len(layout),
            access: if buffer == Buffer::Grad {
                "read"
            } else {
                "read_write"
            }
            .into(),
            state: buffer.is_state(),
            layout: "row-major, decay-major".into(),
        }
    }
}

impl Manifest {
    /// The manifest of a scheduled IR compiled for `arch` by NVRTC `nvrtc_version`; an error
    /// when a kernel needs more blocks than a CUDA grid can have.
    pub fn new(ir: &StepIr, s: &Schedule, arch: &str, nvrtc_version: (i32, i32)) -> Result<Self> {
        let layout = &ir.layout;
        let buffers = Buffer::for_layout(layout)
            .into_iter()
            .map(|b| BufferJson::new(b, layout))
            .collect();
        let scratch_len = s.scratch_len.max(1);
        let partials_len = s.partials_len.max(1);
        let all_params = params(layout);
        let kernels = s
            .kernels
            .iter()
            .map(|k| {
                let (kind, blocks) = match k.kind {
                    KernelKind::Elem { .. } => ("elem", s.tiling.blocks()),
                    KernelKind::Small { blocks, .. } => ("small", blocks),
                };
                Ok(KernelJson {
                    name: k.name.clone(),
                    kind: kind.into(),
                    grid: [
                        grid_dim(
                            blocks,
                            &format!("kernel {} of shape {}", k.name, layout.shape()),
                        )?,
                        1,
                        1,
                    ],
                    block: [BLOCK_DIM_X, 1, 1],
                    shared_mem_bytes: 0,
                    summary: super::render::summary(ir, k),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let kernels_text = super::render::render_kernels(ir, s, super::render::Form::Global)?;
        let constants = constants_json(&super::render::constant_arrays([ir], &kernels_text)?);
        Ok(Manifest {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            generator: format!("mulo {}", env!("CARGO_PKG_VERSION")),
            shape: layout.shape().dims().to_vec(),
            dims: layout.dims().to_vec(),
            numel: layout.numel(),
            factored: layout.factored().map(|f| FactoredJson { d0: f.d0, d1: f.d1 }),
            arch: arch.to_string(),
            nvrtc_version: format!("{}.{}", nvrtc_version.0, nvrtc_version.1),
            ptx_isa: String::new(),
            min_driver: String::new(),
            lopt_fingerprint: ir.lopt_fingerprint.clone(),
            ptx: "mulo_step.ptx".into(),
            source: "mulo_step.cu".into(),
            elem_passes: s.elem_passes,
            buffers,
            scratch: vec![
                ScratchJson {
                    name: "scratch".into(),
                    dtype: "f32".into(),
                    len: scratch_len,
                    bytes: scratch_len * 4,
                },
                ScratchJson {
                    name: "partials".into(),
                    dtype: "f64".into(),
                    len: partials_len,
                    bytes: partials_len * 8,
                },
            ],
            scalars: RuntimeScalar::ALL
                .iter()
                .map(|&sc| ScalarJson {
                    name: sc.name().into(),
                    dtype: "f32".into(),
                    meaning: scalar_meaning(sc).into(),
                })
                .collect(),
            args: all_params
                .iter()
                .map(|p| ArgJson {
                    name: p.name.clone(),
                    kind: p.kind.into(),
                    dtype: p.dtype.into(),
                })
                .collect(),
            kernels,
            constants,
            protocol: "Load mulo_step.ptx as a module and copy every array of `constants` into it \
                       (the module's global of that name; `len` f32 values from `hex`). Allocate every buffer (f32, the shapes given; \
                       state zero before the first step) and the scratch arenas once. For each step: \
                       launch every kernel of `kernels` in order on one stream, each with grid/block as \
                       given and the arguments of `args` in order (device pointers, then lr, \
                       weight_decay, step as f32 by value); then increment the step counter. param and \
                       the state are updated in place."
                .into(),
        })
    }

    /// Fills [`ptx_isa`](Self::ptx_isa) and [`min_driver`](Self::min_driver) from the PTX.
    pub fn record_ptx(&mut self, ptx: &str) {
        (self.ptx_isa, self.min_driver) = ptx_requirements(ptx);
    }

    /// Pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// What a runtime scalar is, for the manifest's `scalars`.
fn scalar_meaning(s: RuntimeScalar) -> &'static str {
    match s {
        RuntimeScalar::Lr => "learning rate (after any μP scaling)",
        RuntimeScalar::WeightDecay => "weight decay (≥ 0), applied as P − lr·wd·P after the update",
        RuntimeScalar::StepCount => "step counter t: steps taken before this one, as f32 (0 on the first step); the host increments it after each step",
    }
}

/// The runtime scalars' values for one step, in [`RuntimeScalar::ALL`]'s order: the one
/// order of the kernels' scalar arguments ([`params`]), the packed table's scalar fields
/// ([`table_fields`](super::packed::table_fields)) and both manifests, so that no launch or
/// table writes them in an order of its own.
pub fn scalar_values(hyper: Hyper, step: f32) -> [f32; 3] {
    RuntimeScalar::ALL.map(|s| match s {
        RuntimeScalar::Lr => hyper.lr,
        RuntimeScalar::WeightDecay => hyper.weight_decay,
        RuntimeScalar::StepCount => step,
    })
}

/// The PTX ISA version of `ptx` and the oldest driver that loads it, as manifest strings.
pub fn ptx_requirements(ptx: &str) -> (String, String) {
    use super::nvrtc::{min_linux_driver, ptx_isa_min_cuda, ptx_isa_version};
    match ptx_isa_version(ptx) {
        Some(isa) => (
            format!("{}.{}", isa.0, isa.1),
            ptx_isa_min_cuda(isa).map_or("unknown".into(), |v| {
                format!(
                    "CUDA {}.{} ({})",
                    v / 1000,
                    (v % 1000) / 10,
                    min_linux_driver(v)
                )
            }),
        ),
        None => (String::new(), String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::schedule::{schedule, MAX_GRID_X};
    use crate::lopt::LearnedOptimizer;
    use crate::shape::Shape;

    #[test]
    fn grids_beyond_cudas_limit_are_an_error_not_a_truncation() {
        let lopt = LearnedOptimizer::demo();
        // Rank 13, every axis 8: 8^11 = 2^33 rest points, one block each per element pass,
        // which `as u32` would have made 0 (2^39 elements, within the 2^40 limit).
        let eights = vec!["8"; 13].join("x");
        let ir = crate::compile_step(&Shape::parse(&eights).unwrap(), &lopt).unwrap();
        let s = schedule(&ir);
        assert!(s.tiling.blocks() > MAX_GRID_X as usize);
        let err = Manifest::new(&ir, &s, "sm_80", (12, 9))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mulo_elem_0_reduce") && err.contains(&eights),
            "{err}"
        );
        let ir = crate::compile_step(&Shape::parse("64x32").unwrap(), &lopt).unwrap();
        let s = schedule(&ir);
        let m = Manifest::new(&ir, &s, "sm_80", (12, 9)).unwrap();
        assert!(m
            .kernels
            .iter()
            .all(|k| k.grid[0] >= 1 && k.block == [256, 1, 1]));
        let mut m = m;
        m.record_ptx("//\n.version 8.5\n.target sm_80\n");
        assert_eq!(
            (m.ptx_isa.as_str(), m.min_driver.as_str()),
            ("8.5", "CUDA 12.5 (R555)")
        );
    }

    /// The element passes' grids are the tiles of `[outer rest] × Y × X'`: for a conv weight
    /// the inner axes run with X along the threads instead of taking a block each.
    #[test]
    fn elem_grids_are_the_tiles_along_x_prime() {
        let lopt = LearnedOptimizer::demo();
        // (shape, factored axes, blocks): 16x8x3x3 is 72 contiguous floats x 16 rows (3 tiles
        // of 32 along X', one of 8·2 rows); 64x3x7x7 on (0,2) is 3 outer points x 2 tiles of
        // 32 of the 49 floats of X' x 2 tiles of 8·4 of the 64 rows.
        for (shape, axes, blocks) in [
            ("16x8x3x3", None, 3),
            ("64x3x7x7", Some((0, 2)), 12),
            ("64x32", None, 2),
            ("37", None, 1),
        ] {
            let axes = axes.map(|(d0, d1)| crate::shape::FactoredAxes { d0, d1 });
            let layout =
                crate::shape::Layout::with_axes(Shape::parse(shape).unwrap(), axes).unwrap();
            let ir = crate::compile_layout(&layout, &lopt).unwrap();
            let s = schedule(&ir);
            assert_eq!(s.tiling.blocks(), blocks, "{shape}");
            let m = Manifest::new(&ir, &s, "sm_80", (12, 9)).unwrap();
            let elem: Vec<[u32; 3]> = m
                .kernels
                .iter()
                .filter(|k| k.kind == "elem")
                .map(|k| k.grid)
                .collect();
            assert_eq!(elem.len(), s.elem_passes, "{shape}");
            assert!(
                elem.iter().all(|&g| g == [blocks as u32, 1, 1]),
                "{shape}: {elem:?}"
            );
        }
    }

    /// The one-block kernels of a step may only do what is negligible next to a pass over a
    /// big tensor's elements: pointwise nodes on at most `BLOCK_POINTS` points, and means
    /// summing at most `CHUNK_THRESHOLD` values per lane and point (longer ones are chunked
    /// over the GPU first).
    fn one_block_kernel_is_bounded(ir: &StepIr, s: &Schedule, name: &str) {
        use crate::backend::cuda::schedule::{BLOCK_POINTS, CHUNK_THRESHOLD};
        use crate::ir::Op;
        use crate::shape::Domain;
        let k = s.kernels.iter().find(|k| k.name == name).unwrap();
        let KernelKind::Small { nodes, stores, .. } = &k.kind else {
            panic!("{name}: an element pass on one block");
        };
        let layout = &ir.layout;
        for &v in nodes.iter().chain(stores) {
            let node = ir.node(v);
            let n = layout.domain_len(node.domain);
            assert!(n <= BLOCK_POINTS, "{name}: {v} on {n} points");
            let terms = match (&node.op, s.chunks.get(&v)) {
                (_, Some(&(chunks, _))) => chunks,
                (Op::Mean(a), None) if ir.node(*a).domain == Domain::Elem => s.tiling.blocks() / n,
                (Op::Mean(a), None) => layout.domain_len(ir.node(*a).domain) / n,
                _ => 0,
            };
            assert!(
                terms <= CHUNK_THRESHOLD.max(crate::backend::cuda::schedule::SPREAD_BLOCKS),
                "{name}: {v} sums {terms} values per lane in one block"
            );
        }
    }

    #[test]
    fn big_tensors_launch_no_kernel_on_fewer_than_264_blocks_but_bounded_ones() {
        use crate::backend::cuda::packed::PackedModel;
        use crate::backend::cuda::schedule::SPREAD_BLOCKS;
        let lopt = LearnedOptimizer::demo();
        assert_eq!(SPREAD_BLOCKS, 264, "2 per SM of an H100");
        // 2^20 and more elements: square, wide, tall, 1-d, rank 4, rank 3.
        let shapes = [
            "1024x1024",
            "4096x1024",
            "1024x4096",
            "50257x768",
            "1048576",
            "256x256x4x4",
            "64x1024x16",
        ];
        for shape in shapes {
            let ir = crate::compile_step(&Shape::parse(shape).unwrap(), &lopt).unwrap();
            assert!(ir.layout.numel() >= 1 << 20);
            let s = schedule(&ir);
            let m = Manifest::new(&ir, &s, "sm_90", (12, 9)).unwrap();
            let mut spread = 0;
            for k in &m.kernels {
                if k.grid[0] as usize >= SPREAD_BLOCKS {
                    spread += 1;
                    continue;
                }
                assert_eq!(
                    (k.kind.as_str(), k.grid),
                    ("small", [1, 1, 1]),
                    "{shape}: {k:?}"
                );
                one_block_kernel_is_bounded(&ir, &s, &k.name);
            }
            assert!(spread >= s.elem_passes, "{shape}");
        }
        // The packed program: every tensor of ≥ 2^20 elements runs each of its launches on
        // ≥ 264 blocks or on one bounded block.
        let layouts: Vec<crate::shape::Layout> = ["4096x1024", "37", "1048576", "64x32"]
            .iter()
            .map(|s| crate::shape::Layout::new(Shape::parse(s).unwrap()))
            .collect();
        let model = PackedModel::new(&lopt, &layouts).unwrap();
        let mm = model.manifest("sm_90", (12, 9)).unwrap();
        for t in mm.tensors.iter().filter(|t| t.numel >= 1 << 20) {
            let plan = &model.plans[t.plan];
            for (slot, &b) in t.blocks.iter().enumerate() {
                if b == 0 || b >= SPREAD_BLOCKS {
                    continue;
                }
                assert_eq!(b, 1, "{:?} in slot {slot}", t.shape);
                let k = model.slots[slot].kernels[t.plan].unwrap();
                one_block_kernel_is_bounded(
                    &plan.ir,
                    &plan.schedule,
                    &plan.schedule.kernels[k].name,
                );
            }
        }
    }

    #[test]
    fn constants_round_trip_exactly_and_bad_values_are_refused() {
        let a = crate::backend::cuda::render::ConstArray {
            name: "mulo_w_test".into(),
            label: "test".into(),
            values: vec![1.5, -0.0, f32::MIN_POSITIVE, 3.4e38, f32::NAN],
        };
        let c = ConstantJson::new(&a);
        assert_eq!(c.len, 5);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&c.values().unwrap()), bits(&a.values));
        let back: ConstantJson = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let mut short = c.clone();
        short.hex.pop();
        let mut garbage = c.clone();
        garbage.hex.replace_range(0..2, "zz");
        let mut dtype = c.clone();
        dtype.dtype = "f64".into();
        for bad in [short, garbage, dtype] {
            let e = bad.values().unwrap_err().to_string();
            assert!(e.contains("mulo_w_test"), "{e}");
        }
    }
}
