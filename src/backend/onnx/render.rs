//! IR → ONNX `ModelProto`, one mapping per IR op.
//!
//! A value on domain `D` is a tensor of the full rank of `layout.dims()` with size-1 axes
//! where `D` lacks an axis (keepdims form), so ONNX broadcasting does the IR's broadcast. A
//! vector value (width > 1) has a trailing channel axis. The renderer knows nothing about the
//! μLO math: it walks the nodes of the IR.
//!
//! | IR op | ONNX |
//! |---|---|
//! | `Load` | graph input (Gather of the lane for decay-major state), Reshape to keepdims form |
//! | `Scalar` | graph input (`step`: Cast int64 → float), Reshape to `[1, …, 1]` |
//! | `Const` | initializer `[1, …, 1]` |
//! | `Unary` | Neg · Mul(x, x) · Reciprocal(Sqrt) · Exp · Tanh · Relu |
//! | `Binary` | Add · Sub · Mul · Div · Max |
//! | `Mean` | nested one-axis ReduceMean, innermost axis first; an axis longer than [`MEAN_CHUNK`] is reshaped into two factors (padded with zeros and summed when it does not factor) |
//! | `Pack` | Expand to the pack's domain, Unsqueeze(-1), Concat(-1) |
//! | `Dense` | MatMul with the transposed weights, Add bias |
//! | `Lane` | Gather(axis -1) |
//! | `Store` | Expand, Reshape to the buffer's shape; lanes Unsqueeze(0) + Concat(0) into `*_out` |

use super::OPSET;
use crate::error::{Error, Result};
use crate::ir::{Binary, Buffer, Op, RuntimeScalar, StepIr, Unary, ValueId};
use crate::shape::Domain;
use onnx_protobuf::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use std::collections::BTreeMap;

/// The longest axis a single ReduceMean sums over; longer ones are split first (SPEC.md §3.4:
/// a long sequential f32 sum costs precision).
pub const MEAN_CHUNK: usize = 1024;

/// ONNX IR version written (opset 18 needs IR version 8).
const IR_VERSION: i64 = 8;

struct Renderer<'a> {
    ir: &'a StepIr,
    /// The dimensions the graph computes on (the tensor's, or one chunk's).
    dims: Vec<usize>,
    /// The I/O shape of one lane of an element-domain buffer.
    elem_io: Vec<usize>,
    /// IR values the graph receives as inputs instead of computing them.
    external: BTreeMap<usize, String>,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    counter: usize,
    /// ONNX name of each IR value (keepdims form).
    values: Vec<Option<String>>,
    /// Stored lanes of each buffer, as tensors of the buffer's lane shape.
    stores: BTreeMap<Buffer, BTreeMap<u32, String>>,
    /// Cached shared constants, by key.
    cache: BTreeMap<String, String>,
}

fn attr_int(name: &str, v: i64) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.to_string();
    a.type_ = AttributeType::INT.into();
    a.i = v;
    a
}

fn value_info(name: &str, elem: DataType, shape: &[usize]) -> ValueInfoProto {
    let mut t = type_proto::Tensor::new();
    t.elem_type = elem as i32;
    let mut s = TensorShapeProto::new();
    for &d in shape {
        let mut dim = tensor_shape_proto::Dimension::new();
        dim.set_dim_value(d as i64);
        s.dim.push(dim);
    }
    t.shape = Some(s).into();
    let mut ty = TypeProto::new();
    ty.set_tensor_type(t);
    let mut vi = ValueInfoProto::new();
    vi.name = name.to_string();
    vi.type_ = Some(ty).into();
    vi
}

impl<'a> Renderer<'a> {
    fn rank(&self) -> usize {
        self.dims.len()
    }

    /// The I/O shape of one lane of `buffer`.
    fn lane_shape(&self, buffer: Buffer) -> Vec<usize> {
        if buffer.domain() == Domain::Elem {
            return self.elem_io.clone();
        }
        self.ir
            .layout
            .domain_axes(buffer.domain())
            .into_iter()
            .map(|a| self.dims[a])
            .collect()
    }

    /// The I/O shape of `buffer`, lanes first.
    fn buffer_shape(&self, buffer: Buffer) -> Vec<usize> {
        let mut shape = self.lane_shape(buffer);
        if buffer.lanes() > 1 {
            shape.insert(0, buffer.lanes());
        }
        shape
    }

    /// The keepdims shape of a value on `domain` with `width` lanes.
    fn shape_of(&self, domain: Domain, width: u32) -> Vec<usize> {
        let layout = &self.ir.layout;
        let kept = layout.domain_axes(domain);
        let mut shape: Vec<usize> = (0..self.rank())
            .map(|a| if kept.contains(&a) { self.dims[a] } else { 1 })
            .collect();
        if width > 1 {
            shape.push(width as usize);
        }
        shape
    }

    fn fresh(&mut self, prefix: &str) -> String {
        self.counter += 1;
        format!("{prefix}{}", self.counter)
    }

    /// Appends a node with one output; returns the output's name.
    fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        output: Option<&str>,
    ) -> String {
        let out = match output {
            Some(o) => o.to_string(),
            None => self.fresh("t"),
        };
        let mut n = NodeProto::new();
        n.op_type = op.to_string();
        n.name = format!("{op}_{}", self.nodes.len());
        n.input = inputs.iter().map(|s| s.to_string()).collect();
        n.output = vec![out.clone()];
        n.attribute = attrs;
        self.nodes.push(n);
        out
    }

    fn init_f32(&mut self, prefix: &str, dims: &[usize], data: &[f32]) -> String {
        let name = self.fresh(prefix);
        let mut t = TensorProto::new();
        t.name = name.clone();
        t.data_type = DataType::FLOAT as i32;
        t.dims = dims.iter().map(|&d| d as i64).collect();
        t.raw_data = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializers.push(t);
        name
    }

    /// An int64 initializer, shared between users with the same contents.
    fn init_i64(&mut self, dims: &[usize], data: &[i64]) -> String {
        let key = format!("i64 {dims:?} {data:?}");
        if let Some(name) = self.cache.get(&key) {
            return name.clone();
        }
        let name = self.fresh("k");
        let mut t = TensorProto::new();
        t.name = name.clone();
        t.data_type = DataType::INT64 as i32;
        t.dims = dims.iter().map(|&d| d as i64).collect();
        t.raw_data = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializers.push(t);
        self.cache.insert(key, name.clone());
        name
    }

    fn shape_const(&mut self, shape: &[usize]) -> String {
        let data: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        self.init_i64(&[data.len()], &data)
    }

    fn reshape(&mut self, x: &str, from: &[usize], to: &[usize]) -> String {
        if from == to {
            return x.to_string();
        }
        let s = self.shape_const(to);
        self.node("Reshape", &[x, &s], vec![], None)
    }

    fn expand(&mut self, x: &str, from: &[usize], to: &[usize]) -> String {
        if from == to {
            return x.to_string();
        }
        let s = self.shape_const(to);
        self.node("Expand", &[x, &s], vec![], None)
    }

    fn value(&self, v: ValueId) -> Result<String> {
        self.values[v.index()]
            .clone()
            .ok_or_else(|| Error::Verify(format!("{v} is used but renders to no value (a store?)")))
    }

    /// Broadcasts value `v` to `domain` (keeping its width).
    fn value_on(&mut self, v: ValueId, domain: Domain) -> Result<String> {
        let node = self.ir.node(v);
        let name = self.value(v)?;
        let from = self.shape_of(node.domain, node.width);
        let to = self.shape_of(domain, node.width);
        Ok(self.expand(&name, &from, &to))
    }

    /// Mean over axis `a` of `x` (keepdims), splitting long axes. `shape` is updated.
    fn mean_axis(&mut self, x: &str, shape: &mut Vec<usize>, a: usize) -> String {
        let n = shape[a];
        if n == 1 {
            return x.to_string();
        }
        let axes = self.init_i64(&[1], &[a as i64]);
        if n <= MEAN_CHUNK {
            shape[a] = 1;
            return self.node(
                "ReduceMean",
                &[x, &axes],
                vec![attr_int("keepdims", 1)],
                None,
            );
        }
        // Split the axis into [outer, inner]: an exact divisor near √n if there is one, else
        // pad with zeros to a multiple of ⌈√n⌉ and sum (then correct the count).
        let root = (n as f64).sqrt() as usize;
        let divisor = (root.max(2) / 8..=root)
            .rev()
            .find(|&k| k >= 2 && n.is_multiple_of(k));
        let (x, inner, padded) = match divisor {
            Some(k) => (x.to_string(), k, n),
            None => {
                let k = root + 1;
                let m = n.div_ceil(k) * k;
                let mut pads = vec![0i64; 2 * shape.len()];
                pads[shape.len() + a] = (m - n) as i64;
                let pads = self.init_i64(&[pads.len()], &pads);
                let padded = self.node("Pad", &[x, &pads], vec![], None);
                (padded, k, m)
            }
        };
        let outer = padded / inner;
        let mut split = shape.clone();
        split[a] = padded;
        let from = split.clone();
        split[a] = outer;
        split.insert(a + 1, inner);
        let x = self.reshape(&x, &from, &split);
        let inner_axes = self.init_i64(&[1], &[(a + 1) as i64]);
        let reducer = if padded == n {
            "ReduceMean"
        } else {
            "ReduceSum"
        };
        let x = self.node(
            reducer,
            &[&x, &inner_axes],
            vec![attr_int("keepdims", 0)],
            None,
        );
        shape[a] = outer;
        let mean = self.mean_axis(&x, shape, a);
        if padded == n {
            mean
        } else {
            // mean of the padded sums = total / outer; the mean is total / n.
            let dims = vec![1; shape.len()];
            let c = self.init_f32("c", &dims, &[(outer as f64 / n as f64) as f32]);
            self.node("Mul", &[&mean, &c], vec![], None)
        }
    }

    fn render_node(&mut self, i: usize) -> Result<Option<String>> {
        let ir = self.ir;
        let node = &ir.nodes[i];
        if let Some(name) = self.external.get(&i) {
            return Ok(Some(name.clone()));
        }
        let out_name = format!("v{i}");
        let out = Some(out_name.as_str());
        let my_shape = self.shape_of(node.domain, node.width);
        let name = match &node.op {
            Op::Load { buffer, lane } => {
                let input = buffer.name();
                let lane_shape = self.lane_shape(*buffer);
                let x = if buffer.lanes() > 1 {
                    let idx = self.init_i64(&[], &[*lane as i64]);
                    self.node("Gather", &[input, &idx], vec![attr_int("axis", 0)], None)
                } else {
                    input.to_string()
                };
                let x = self.reshape(&x, &lane_shape, &my_shape);
                self.node("Identity", &[&x], vec![], out)
            }
            Op::Scalar(s) => {
                let x = match s {
                    RuntimeScalar::Lr => "lr".to_string(),
                    RuntimeScalar::WeightDecay => "weight_decay".to_string(),
                    RuntimeScalar::StepCount => self.node(
                        "Cast",
                        &["step"],
                        vec![attr_int("to", DataType::FLOAT as i64)],
                        None,
                    ),
                };
                let x = self.reshape(&x, &[], &my_shape);
                self.node("Identity", &[&x], vec![], out)
            }
            Op::Const(c) => {
                let t = self.init_f32("c", &my_shape, &[*c as f32]);
                self.node("Identity", &[&t], vec![], out)
            }
            Op::Unary(op, a) => {
                let x = self.value_on(*a, node.domain)?;
                match op {
                    Unary::Neg => self.node("Neg", &[&x], vec![], out),
                    Unary::Square => self.node("Mul", &[&x, &x], vec![], out),
                    Unary::Rsqrt => {
                        let s = self.node("Sqrt", &[&x], vec![], None);
                        self.node("Reciprocal", &[&s], vec![], out)
                    }
                    Unary::Exp => self.node("Exp", &[&x], vec![], out),
                    Unary::Tanh => self.node("Tanh", &[&x], vec![], out),
                    Unary::Relu => self.node("Relu", &[&x], vec![], out),
                    // ONNX has no nan_to_num: Where(IsNaN(x), 0, Min(Max(x, −MAX), MAX)).
                    // The NaN test comes first because Max/Min's NaN handling varies by runtime.
                    Unary::NanToNum => {
                        let nan = self.node("IsNaN", &[&x], vec![], None);
                        let zero = self.init_f32("c", &[], &[0.0]);
                        let lo = self.init_f32("c", &[], &[-f32::MAX]);
                        let hi = self.init_f32("c", &[], &[f32::MAX]);
                        let above = self.node("Max", &[&x, &lo], vec![], None);
                        let clamped = self.node("Min", &[&above, &hi], vec![], None);
                        self.node("Where", &[&nan, &zero, &clamped], vec![], out)
                    }
                }
            }
            Op::Binary(op, a, b) => {
                let (na, nb) = (ir.node(*a), ir.node(*b));
                let joined = na.domain.join(nb.domain);
                let (xa, xb) = (self.value(*a)?, self.value(*b)?);
                let onnx_op = match op {
                    Binary::Add => "Add",
                    Binary::Sub => "Sub",
                    Binary::Mul => "Mul",
                    Binary::Div => "Div",
                    Binary::Max => "Max",
                };
                if joined == node.domain {
                    self.node(onnx_op, &[&xa, &xb], vec![], out)
                } else {
                    let r = self.node(onnx_op, &[&xa, &xb], vec![], None);
                    let from = self.shape_of(joined, node.width);
                    let r = self.expand(&r, &from, &my_shape);
                    self.node("Identity", &[&r], vec![], out)
                }
            }
            Op::Mean(a) => {
                let na = ir.node(*a);
                let from_axes = ir.layout.domain_axes(na.domain);
                let to_axes = ir.layout.domain_axes(node.domain);
                let mut shape = self.shape_of(na.domain, na.width);
                let mut x = self.value(*a)?;
                for &axis in from_axes.iter().rev() {
                    if !to_axes.contains(&axis) {
                        x = self.mean_axis(&x, &mut shape, axis);
                    }
                }
                self.node("Identity", &[&x], vec![], out)
            }
            Op::Pack(xs) => {
                let minus_one = self.init_i64(&[1], &[-1]);
                let mut parts = Vec::with_capacity(xs.len());
                for &x in xs {
                    let v = self.value_on(x, node.domain)?;
                    parts.push(self.node("Unsqueeze", &[&v, &minus_one], vec![], None));
                }
                let refs: Vec<&str> = parts.iter().map(|s| s.as_str()).collect();
                self.node("Concat", &refs, vec![attr_int("axis", -1)], out)
            }
            Op::Dense { matrix, x } => {
                let m = ir.matrix(*matrix);
                let xin = self.value_on(*x, node.domain)?;
                // Wᵀ: [cols, rows].
                let mut wt = vec![0f32; m.rows * m.cols];
                for r in 0..m.rows {
                    for c in 0..m.cols {
                        wt[c * m.rows + r] = m.w(r, c);
                    }
                }
                let w = self.init_f32("w", &[m.cols, m.rows], &wt);
                match &m.bias {
                    None => self.node("MatMul", &[&xin, &w], vec![], out),
                    Some(bias) => {
                        let mm = self.node("MatMul", &[&xin, &w], vec![], None);
                        let b = self.init_f32("b", &[m.rows], bias);
                        self.node("Add", &[&mm, &b], vec![], out)
                    }
                }
            }
            Op::Lane { x, lane } => {
                let xin = self.value_on(*x, node.domain)?;
                let idx = self.init_i64(&[], &[*lane as i64]);
                self.node("Gather", &[&xin, &idx], vec![attr_int("axis", -1)], out)
            }
            Op::Store {
                buffer,
                lane,
                value,
            } => {
                let v = self.value_on(*value, node.domain)?;
                let lane_shape = self.lane_shape(*buffer);
                let v = self.reshape(&v, &my_shape, &lane_shape);
                self.stores.entry(*buffer).or_default().insert(*lane, v);
                return Ok(None);
            }
        };
        Ok(Some(name))
    }

    /// Outputs `{buffer}_out` for each of `buffers`: lanes stacked decay-major. A lane the IR
    /// never stores passes its input through.
    fn render_outputs(&mut self, buffers: &[Buffer]) -> Result<()> {
        for &buffer in buffers {
            let out = format!("{}_out", buffer.name());
            let stored = self.stores.get(&buffer).cloned().unwrap_or_default();
            if buffer.lanes() == 1 {
                let x = stored
                    .get(&0)
                    .cloned()
                    .unwrap_or_else(|| buffer.name().to_string());
                self.node("Identity", &[&x], vec![], Some(&out));
                continue;
            }
            let zero = self.init_i64(&[1], &[0]);
            let mut lanes = Vec::new();
            for lane in 0..buffer.lanes() as u32 {
                let x = match stored.get(&lane) {
                    Some(x) => self.node("Unsqueeze", &[x, &zero], vec![], None),
                    None => {
                        let idx = self.init_i64(&[1], &[lane as i64]);
                        self.node(
                            "Gather",
                            &[buffer.name(), &idx],
                            vec![attr_int("axis", 0)],
                            None,
                        )
                    }
                };
                lanes.push(x);
            }
            let refs: Vec<&str> = lanes.iter().map(|s| s.as_str()).collect();
            self.node("Concat", &refs, vec![attr_int("axis", 0)], Some(&out));
        }
        Ok(())
    }
}

/// What one rendered graph covers: the whole step, or a part of it (see [`super::chunked`]).
#[derive(Clone, Debug)]
pub struct GraphSpec {
    /// Graph name.
    pub name: String,
    /// The dimensions the graph computes on (`layout.dims()`, or one chunk's).
    pub dims: Vec<usize>,
    /// The I/O shape of one lane of an element-domain buffer.
    pub elem_io: Vec<usize>,
    /// Which IR nodes the graph renders (indexed like `ir.nodes`).
    pub render: Vec<bool>,
    /// IR values received as graph inputs (f32, keepdims shape), by node index.
    pub external: Vec<usize>,
    /// Buffers read as graph inputs.
    pub input_buffers: Vec<Buffer>,
    /// Whether the graph takes `step`, `lr`, `weight_decay`.
    pub scalar_inputs: bool,
    /// Buffers written as `{buffer}_out`.
    pub output_buffers: Vec<Buffer>,
    /// IR values exported as outputs `x{i}` (f32, keepdims shape), by node index.
    pub value_outputs: Vec<usize>,
    /// Whether the graph outputs `step_out`.
    pub step_out: bool,
}

impl GraphSpec {
    /// The whole step with the I/O contract of the exported `mulo_step.onnx`.
    pub fn whole(ir: &StepIr) -> Self {
        let layout = &ir.layout;
        GraphSpec {
            name: format!("mulo_step_{}", layout.shape()),
            dims: layout.dims().to_vec(),
            elem_io: layout.shape().dims().to_vec(),
            render: vec![true; ir.nodes.len()],
            external: Vec::new(),
            input_buffers: Buffer::for_layout(layout),
            scalar_inputs: true,
            output_buffers: Buffer::for_layout(layout)
                .into_iter()
                .filter(|b| *b != Buffer::Grad)
                .collect(),
            value_outputs: Vec::new(),
            step_out: true,
        }
    }
}

/// The name of an IR value exported by a partial graph.
pub fn value_name(i: usize) -> String {
    format!("x{i}")
}

/// Renders `ir` as an ONNX model (opset [`OPSET`], standard domain only).
pub fn render(ir: &StepIr) -> Result<ModelProto> {
    render_graph(ir, &GraphSpec::whole(ir))
}

/// Renders the part of `ir` that `spec` describes.
pub fn render_graph(ir: &StepIr, spec: &GraphSpec) -> Result<ModelProto> {
    let mut r = Renderer {
        ir,
        dims: spec.dims.clone(),
        elem_io: spec.elem_io.clone(),
        external: spec.external.iter().map(|&i| (i, value_name(i))).collect(),
        nodes: Vec::new(),
        initializers: Vec::new(),
        counter: 0,
        values: vec![None; ir.nodes.len()],
        stores: BTreeMap::new(),
        cache: BTreeMap::new(),
    };
    for i in 0..ir.nodes.len() {
        if spec.render[i] || r.external.contains_key(&i) {
            r.values[i] = r.render_node(i)?;
        }
    }
    r.render_outputs(&spec.output_buffers)?;
    let mut value_outputs = Vec::new();
    for &i in &spec.value_outputs {
        let name = r.value(ValueId(i as u32))?;
        let out = value_name(i);
        r.node("Identity", &[&name], vec![], Some(&out));
        let node = &ir.nodes[i];
        value_outputs.push((out, r.shape_of(node.domain, node.width)));
    }
    if spec.step_out {
        let one = r.init_i64(&[], &[1]);
        r.node("Add", &["step", &one], vec![], Some("step_out"));
    }

    let mut graph = GraphProto::new();
    graph.name = spec.name.clone();
    for &buffer in &spec.input_buffers {
        graph.input.push(value_info(
            buffer.name(),
            DataType::FLOAT,
            &r.buffer_shape(buffer),
        ));
    }
    for &i in &spec.external {
        let node = &ir.nodes[i];
        graph.input.push(value_info(
            &value_name(i),
            DataType::FLOAT,
            &r.shape_of(node.domain, node.width),
        ));
    }
    if spec.scalar_inputs {
        graph.input.push(value_info(
            RuntimeScalar::StepCount.name(),
            DataType::INT64,
            &[],
        ));
        graph
            .input
            .push(value_info(RuntimeScalar::Lr.name(), DataType::FLOAT, &[]));
        graph.input.push(value_info(
            RuntimeScalar::WeightDecay.name(),
            DataType::FLOAT,
            &[],
        ));
    }
    for &buffer in &spec.output_buffers {
        graph.output.push(value_info(
            &format!("{}_out", buffer.name()),
            DataType::FLOAT,
            &r.buffer_shape(buffer),
        ));
    }
    for (name, shape) in &value_outputs {
        graph.output.push(value_info(name, DataType::FLOAT, shape));
    }
    if spec.step_out {
        graph
            .output
            .push(value_info("step_out", DataType::INT64, &[]));
    }
    graph.node = r.nodes;
    graph.initializer = r.initializers;
    graph.doc_string = format!(
        "One μLO step for a tensor of shape {} (learned optimizer {}); rendered by mulo from the step IR.",
        ir.layout.shape(),
        ir.lopt_fingerprint
    );

    let mut model = ModelProto::new();
    model.ir_version = IR_VERSION;
    let mut opset = OperatorSetIdProto::new();
    opset.domain = String::new();
    opset.version = OPSET;
    model.opset_import.push(opset);
    model.producer_name = "mulo".to_string();
    model.producer_version = env!("CARGO_PKG_VERSION").to_string();
    model.graph = Some(graph).into();
    // What the step depends on beyond the graph's I/O shapes: a tensor of this shape with other
    // factored axes steps differently (SPEC.md §2).
    for (key, value) in [
        ("mulo.shape", format!("{:?}", ir.layout.shape().dims())),
        (
            "mulo.factored_axes",
            ir.layout
                .factored()
                .map_or("null".to_string(), |f| format!("[{}, {}]", f.d0, f.d1)),
        ),
        ("mulo.lopt_fingerprint", ir.lopt_fingerprint.clone()),
    ] {
        let mut entry = StringStringEntryProto::new();
        entry.key = key.to_string();
        entry.value = value;
        model.metadata_props.push(entry);
    }
    Ok(model)
}
