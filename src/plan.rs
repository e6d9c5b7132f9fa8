//! The pass plan of a step, independent of any target: how the IR splits into passes over the
//! element data and, between them, work on the small domains (rows, columns, rest points, the
//! step). The CUDA schedule and the CPU backend render from it, and `bench` derives the
//! memory traffic per element from it.
//!
//! - The **level** of a node is the number of means over the element domain on its dependency
//!   path: such a mean needs every element before any of its users can run, so it is a barrier.
//! - **Pass** `k` makes one sweep over the elements. A reduce pass computes the operands of
//!   the element means given to it and accumulates them; a mean is given to the last pass
//!   before its first user (at least its operand's level). The last pass computes what the
//!   element-domain stores need and stores it. Element values are recomputed in every pass that
//!   needs them and never stored except by `Store`.
//! - **Stage** `k` (before pass `k`) finishes the element means of pass `k − 1` and computes
//!   every small-domain node as late as its users allow. The last stage also performs the
//!   stores of the small domains, after every load of them.
//! - Constants and runtime scalars belong to no pass: every target inlines them.

use crate::ir::{Op, StepIr, ValueId};
use crate::shape::Domain;
use std::collections::BTreeSet;

/// Whether a node is inlined where it is used (a constant or a runtime scalar).
pub fn is_inlined(op: &Op) -> bool {
    matches!(op, Op::Const(_) | Op::Scalar(_))
}

/// Whether a node is an element-domain mean (a barrier).
pub fn is_elem_mean(ir: &StepIr, id: ValueId) -> bool {
    match ir.node(id).op {
        Op::Mean(a) => ir.node(a).domain == Domain::Elem,
        _ => false,
    }
}

/// Levels of every node: the number of element means on its dependency path.
pub fn levels(ir: &StepIr) -> Vec<u32> {
    levels_by(ir, |v| is_elem_mean(ir, v))
}

/// Levels of every node counting only the barriers `barrier` picks: the number of such nodes
/// on its dependency path (a barrier counts itself). [`levels`] counts the element means;
/// [`StagePlan`] the means that cross a sharded axis.
pub fn levels_by(ir: &StepIr, barrier: impl Fn(ValueId) -> bool) -> Vec<u32> {
    let mut level = vec![0u32; ir.nodes.len()];
    for (i, node) in ir.nodes.iter().enumerate() {
        let base = node
            .op
            .operands()
            .iter()
            .map(|o| level[o.index()])
            .max()
            .unwrap_or(0);
        level[i] = base + barrier(ValueId(i as u32)) as u32;
    }
    level
}

/// Whether node `id` is a mean that crosses axis `axis` of the layout: its operand's domain
/// keeps the axis and its own does not (it sums along that axis). With the tensor split along
/// `axis`, such a mean needs every part's partial sums.
pub fn crosses_axis(ir: &StepIr, id: ValueId, axis: usize) -> bool {
    match ir.node(id).op {
        Op::Mean(a) => {
            let keeps = |d: Domain| ir.layout.domain_axes(d).contains(&axis);
            keeps(ir.node(a).domain) && !keeps(ir.node(id).domain)
        }
        _ => false,
    }
}

/// The element-domain nodes a pass computes for `roots` (in topological order), and the
/// small-domain non-inlined nodes it reads.
pub fn elem_closure(ir: &StepIr, roots: &[ValueId]) -> (Vec<ValueId>, BTreeSet<ValueId>) {
    let mut need = vec![false; ir.nodes.len()];
    let mut reads = BTreeSet::new();
    let mut stack: Vec<ValueId> = roots.to_vec();
    while let Some(v) = stack.pop() {
        let node = ir.node(v);
        if node.domain != Domain::Elem {
            if !is_inlined(&node.op) {
                reads.insert(v);
            }
            continue;
        }
        if std::mem::replace(&mut need[v.index()], true) {
            continue;
        }
        stack.extend(node.op.operands());
    }
    let nodes = ir.ids().filter(|v| need[v.index()]).collect();
    (nodes, reads)
}

/// The partition of a step into passes and stages (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassPlan {
    /// Level of every node.
    pub levels: Vec<u32>,
    /// The last level: passes are numbered `0..=last`, the last one performs the stores.
    pub last: u32,
    /// For every non-inlined small-domain node (stores included): the stage computing it.
    pub stage: Vec<Option<u32>>,
    /// For every level `k`: the element means whose operands pass `k` reduces.
    pub pass_means: Vec<Vec<ValueId>>,
    /// The small-domain stores (performed by the last stage).
    pub small_stores: Vec<ValueId>,
    /// The element-domain stores (performed by the last pass).
    pub elem_stores: Vec<ValueId>,
}

impl PassPlan {
    /// The plan of `ir`: every small node as late as its users allow, every element mean
    /// reduced by the pass just before its first user. Late placement keeps early passes
    /// light: pass 0 of a factored tensor reads only G, as the 72 B/element floor of
    /// SPEC.md §5 assumes.
    pub fn of(ir: &StepIr) -> Self {
        let level = levels(ir);
        let n = ir.nodes.len();
        let is_store = |v: ValueId| matches!(ir.node(v).op, Op::Store { .. });
        let small_stores: Vec<ValueId> = ir
            .ids()
            .filter(|&v| is_store(v) && ir.node(v).domain != Domain::Elem)
            .collect();
        let elem_stores: Vec<ValueId> = ir
            .ids()
            .filter(|&v| is_store(v) && ir.node(v).domain == Domain::Elem)
            .collect();
        let last = ir
            .ids()
            .filter(|&v| is_store(v) || is_elem_mean(ir, v))
            .map(|v| level[v.index()])
            .max()
            .unwrap_or(0);
        // One sweep in reverse topological order: `stage[v]` of a small node is the stage
        // computing it; an element node is needed from the first pass that uses it
        // (`deadline`); an element mean's operand is reduced by the pass before its stage.
        let mut stage: Vec<Option<u32>> = vec![None; n];
        let mut deadline: Vec<u32> = vec![last; n];
        for i in (0..n).rev() {
            let id = ValueId(i as u32);
            let node = &ir.nodes[i];
            if is_inlined(&node.op) {
                continue;
            }
            let store = is_store(id);
            let need = if node.domain == Domain::Elem {
                if store {
                    last
                } else {
                    deadline[i]
                }
            } else {
                let s = if store {
                    last
                } else {
                    deadline[i].max(level[i])
                };
                stage[i] = Some(s);
                if is_elem_mean(ir, id) {
                    s.saturating_sub(1)
                } else {
                    s
                }
            };
            for o in node.op.operands() {
                deadline[o.index()] = deadline[o.index()].min(need);
            }
        }
        let mut pass_means: Vec<Vec<ValueId>> = vec![Vec::new(); last as usize + 1];
        for v in ir.ids().filter(|&v| is_elem_mean(ir, v)) {
            if let Some(s) = stage[v.index()] {
                pass_means[s.saturating_sub(1) as usize].push(v);
            }
        }
        PassPlan {
            levels: level,
            last,
            stage,
            pass_means,
            small_stores,
            elem_stores,
        }
    }

    /// The levels that have a pass over the elements: those reducing means, and the last.
    pub fn passes(&self) -> Vec<u32> {
        (0..=self.last)
            .filter(|&k| k == self.last || !self.pass_means[k as usize].is_empty())
            .collect()
    }

    /// The nodes pass `k` must produce: the operands of its means, and (last pass) the
    /// element stores.
    pub fn pass_roots(&self, ir: &StepIr, k: u32) -> Vec<ValueId> {
        if k == self.last {
            self.elem_stores.clone()
        } else {
            self.pass_means[k as usize]
                .iter()
                .map(|&m| ir.node(m).op.operands()[0])
                .collect()
        }
    }

    /// The non-store small nodes stage `k` computes, in topological order.
    pub fn stage_nodes(&self, ir: &StepIr, k: u32) -> Vec<ValueId> {
        ir.ids()
            .filter(|v| {
                self.stage[v.index()] == Some(k) && !matches!(ir.node(*v).op, Op::Store { .. })
            })
            .collect()
    }

    /// Multiply-adds of the dense layers per element: those of every pass's closure (counted
    /// once per pass that recomputes them), plus those of the stages, amortized over the
    /// elements that share their points.
    pub fn madds_per_element(&self, ir: &StepIr) -> f64 {
        let numel = ir.layout.numel() as f64;
        let madds = |v: ValueId| match ir.node(v).op {
            Op::Dense { matrix, .. } => {
                let m = ir.matrix(matrix);
                (m.rows * m.cols) as f64
            }
            _ => 0.0,
        };
        let mut total = 0f64;
        for k in self.passes() {
            let (nodes, _) = elem_closure(ir, &self.pass_roots(ir, k));
            total += nodes.into_iter().map(madds).sum::<f64>();
        }
        for v in ir.ids().filter(|v| self.stage[v.index()].is_some()) {
            total += madds(v) * ir.layout.domain_len(ir.node(v).domain) as f64 / numel;
        }
        total
    }

    /// Bytes of element data every pass reads and writes, per element, with f32 buffers:
    /// each element-domain load of a pass's closure read once per pass, each element store
    /// written once. This is the device-memory traffic floor of the plan (small-domain data
    /// and reduction partials are not counted: they shrink with the element count).
    pub fn bytes_per_element(&self, ir: &StepIr) -> f64 {
        let mut bytes = 0usize;
        for k in self.passes() {
            let (nodes, _) = elem_closure(ir, &self.pass_roots(ir, k));
            let mut loads = BTreeSet::new();
            for v in nodes {
                match ir.node(v).op {
                    Op::Load { buffer, lane } => {
                        loads.insert((buffer, lane));
                    }
                    Op::Store { .. } => bytes += 4,
                    _ => {}
                }
            }
            bytes += 4 * loads.len();
        }
        bytes as f64
    }
}

/// One sweep over the elements of a [`StagePlan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagePass {
    /// The stage it runs in.
    pub stage: u32,
    /// Its element level: it runs after the small nodes of `(stage, level)`.
    pub level: u32,
    /// The element means whose operands it reduces (their operands are at `(stage, level)`).
    pub means: Vec<ValueId>,
    /// Whether it is the last pass, which performs the element stores.
    pub last: bool,
}

/// The partition of a step into **stages** for a tensor split along one axis (the rows of
/// axis 0 under FSDP's `Shard(0)`): every backend's staged step renders this one plan.
///
/// - A **cross mean** is a mean over the split axis ([`crosses_axis`]): no part can finish it
///   alone. The **stage** of a node is the number of cross means on its dependency path
///   ([`levels_by`]): stage `s` needs the sums of round `s − 1` and nothing later.
/// - **Round** `r` carries the partial sums of the cross means of stage `r + 1`
///   ([`round_means`](Self::round_means)), each `width × points` f64 sums over the part's
///   elements (points of the mean's domain, which does not keep the split axis, so every part
///   has all of them), in node order. The host adds every part's round buffer; stage `r + 1`
///   divides each sum by the whole tensor's count.
/// - Within a stage, the element means that do not cross (e.g. the row accumulator of a tensor
///   split by rows) are barriers as in [`PassPlan`]: the **element level** ([`levels`]) orders
///   the work. A stage runs, for each level `l` in order: the small-domain nodes of
///   `(stage, l)` ([`small_nodes`](Self::small_nodes)), then the pass `(stage, l)` if there is
///   one ([`passes`](Self::passes)). Then the partial sums of the next round: those of a cross
///   element mean are accumulated by the pass of its operand (the stage's own), those of a
///   cross small-domain mean summed from its operand's values.
/// - The last stage (`rounds()`) ends with the last pass (element stores), then the
///   small-domain stores.
///
/// Without a split axis there are no cross means: one stage, whose passes are those of the
/// unsplit step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagePlan {
    /// The split axis (`None`: not split).
    pub axis: Option<usize>,
    /// Element level of every node ([`levels`]).
    pub levels: Vec<u32>,
    /// Stage of every node.
    pub stage: Vec<u32>,
    /// Whether each node is a cross mean.
    pub cross: Vec<bool>,
    /// For every round: the cross means whose partial sums it carries, in node order.
    pub round_means: Vec<Vec<ValueId>>,
    /// The passes in the order they run (by stage, then level).
    pub passes: Vec<StagePass>,
}

impl StagePlan {
    /// The stages of `ir` (compiled for the whole tensor) split along `axis`.
    pub fn of(ir: &StepIr, axis: Option<usize>) -> Self {
        let cross: Vec<bool> = ir
            .ids()
            .map(|v| axis.is_some_and(|a| crosses_axis(ir, v, a)))
            .collect();
        let stage = levels_by(ir, |v| cross[v.index()]);
        let level = levels(ir);
        let rounds = stage.iter().copied().max().unwrap_or(0);
        let mut round_means = vec![Vec::new(); rounds as usize];
        for v in ir.ids().filter(|v| cross[v.index()]) {
            round_means[stage[v.index()] as usize - 1].push(v);
        }
        let mut reduce: std::collections::BTreeMap<(u32, u32), Vec<ValueId>> =
            std::collections::BTreeMap::new();
        for v in ir.ids().filter(|&v| is_elem_mean(ir, v)) {
            let a = ir.node(v).op.operands()[0];
            reduce
                .entry((stage[a.index()], level[a.index()]))
                .or_default()
                .push(v);
        }
        // The last pass runs after every small node of the last stage: a mean reduced there
        // would be above every level of that stage, so it has no means of its own.
        let last_level = ir
            .ids()
            .filter(|v| stage[v.index()] == rounds)
            .map(|v| level[v.index()])
            .max()
            .unwrap_or(0);
        debug_assert!(!reduce.contains_key(&(rounds, last_level)));
        let mut passes: Vec<StagePass> = reduce
            .into_iter()
            .map(|((stage, level), means)| StagePass {
                stage,
                level,
                means,
                last: false,
            })
            .collect();
        passes.push(StagePass {
            stage: rounds,
            level: last_level,
            means: Vec::new(),
            last: true,
        });
        StagePlan {
            axis,
            levels: level,
            stage,
            cross,
            round_means,
            passes,
        }
    }

    /// Number of rounds (combines of partial sums) a step needs.
    pub fn rounds(&self) -> usize {
        self.round_means.len()
    }

    /// The highest element level of the nodes of `stage`.
    pub fn max_level(&self, stage: u32) -> u32 {
        self.stage
            .iter()
            .zip(&self.levels)
            .filter(|(&s, _)| s == stage)
            .map(|(_, &l)| l)
            .max()
            .unwrap_or(0)
    }

    /// Round `round`'s buffer: each cross mean with its offset, and the total length (f64
    /// sums: width × points of the mean's domain, for the whole tensor's layout).
    pub fn round_slots(&self, ir: &StepIr, round: usize) -> (Vec<(ValueId, usize)>, usize) {
        let mut off = 0;
        let slots = self.round_means[round]
            .iter()
            .map(|&m| {
                let node = ir.node(m);
                let at = off;
                off += node.width as usize * ir.layout.domain_len(node.domain);
                (m, at)
            })
            .collect();
        (slots, off)
    }

    /// The small-domain nodes of `(stage, level)` that are not stores (inlined ones included),
    /// in topological order.
    pub fn small_nodes(&self, ir: &StepIr, stage: u32, level: u32) -> Vec<ValueId> {
        ir.ids()
            .filter(|&v| {
                let node = ir.node(v);
                node.domain != Domain::Elem
                    && !matches!(node.op, Op::Store { .. })
                    && self.stage[v.index()] == stage
                    && self.levels[v.index()] == level
            })
            .collect()
    }

    /// The nodes pass `i` (of [`passes`](Self::passes)) must produce: the operands of its
    /// means, and (last pass) the element stores.
    pub fn pass_roots(&self, ir: &StepIr, i: usize) -> Vec<ValueId> {
        let pass = &self.passes[i];
        let mut roots: Vec<ValueId> = pass
            .means
            .iter()
            .map(|&m| ir.node(m).op.operands()[0])
            .collect();
        if pass.last {
            roots.extend(ir.ids().filter(|&v| {
                let node = ir.node(v);
                node.domain == Domain::Elem && matches!(node.op, Op::Store { .. })
            }));
        }
        roots
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lopt::LearnedOptimizer;
    use crate::shape::Shape;

    fn plan(shape: &str) -> (StepIr, PassPlan) {
        let ir =
            crate::compile_step(&Shape::parse(shape).unwrap(), &LearnedOptimizer::demo()).unwrap();
        let p = PassPlan::of(&ir);
        (ir, p)
    }

    #[test]
    fn traffic_matches_the_spec_floor() {
        // SPEC.md §5, factored: read G (4 B), read G, P, M, V (24 B), read them again and
        // write P, M, V (24 + 20 B) = 72 B. Unfactored tensors have no row/column pass: pass 0
        // reads G, P, M, V and F (36 B), pass 1 reads them again and writes P, M, V, F
        // (36 + 32 B) = 104 B (SPEC.md's "+24 B" undercounts F, read twice and written once).
        for (shape, want) in [("64x32", 72.0), ("16x8x3x3", 72.0), ("37", 104.0)] {
            let (ir, p) = plan(shape);
            assert_eq!(p.bytes_per_element(&ir), want, "{shape}");
        }
    }

    #[test]
    fn madds_amortize_the_stages() {
        // 64x32: per element 16·32 + 32·32 + 2·32 multiply-adds in the last pass; the row
        // (6 features, 64 rows), column (6 features, 32 columns) and time (11 features, once)
        // parts of the first layer shared by the elements of their points.
        let (ir, p) = plan("64x32");
        let want =
            (16 * 32 + 32 * 32 + 2 * 32) as f64 + (6 * 32 * (64 + 32) + 11 * 32) as f64 / 2048.0;
        assert_eq!(p.madds_per_element(&ir), want);
    }

    #[test]
    fn passes_and_stages() {
        let (ir, p) = plan("64x32");
        assert_eq!(p.passes(), [0, 1, 2]);
        assert_eq!(p.pass_means[0].len(), 2);
        assert_eq!(p.pass_means[1].len(), 16);
        assert_eq!(p.small_stores.len(), 6);
        // Pass 0 reads only the gradient.
        let (nodes, reads) = elem_closure(&ir, &p.pass_roots(&ir, 0));
        assert!(reads.is_empty());
        let loads: Vec<_> = nodes
            .iter()
            .filter_map(|&v| match ir.node(v).op {
                Op::Load { buffer, .. } => Some(buffer),
                _ => None,
            })
            .collect();
        assert_eq!(loads, [crate::ir::Buffer::Grad]);
        let (ir1, p1) = plan("37");
        assert_eq!(p1.passes(), [0, 1]);
        assert!(!p1.stage_nodes(&ir1, 1).is_empty());
    }

    #[test]
    fn stages_split_at_the_means_that_cross_the_axis() {
        // Not split: one stage, the passes of the pass plan.
        for shape in ["64x32", "37", "16x8x3x3"] {
            let (ir, p) = plan(shape);
            let s = StagePlan::of(&ir, None);
            assert_eq!(s.rounds(), 0);
            assert!(s.cross.iter().all(|&c| !c));
            let levels: Vec<u32> = s.passes.iter().map(|q| q.level).collect();
            assert_eq!(levels, p.passes(), "{shape}");
            assert!(s.passes.last().unwrap().last);
        }
        // 64x32 split by rows: round 0 carries the means of g² along axis 0 (those along axis 1
        // stay on the part) and the feature statistics ready by then, round 1 the other
        // feature mean squares; no extra pass over the elements.
        let (ir, p) = plan("64x32");
        let s = StagePlan::of(&ir, Some(0));
        assert_eq!(s.rounds(), 2);
        for (r, means) in s.round_means.iter().enumerate() {
            for &m in means {
                assert!(crosses_axis(&ir, m, 0));
                assert_eq!(s.stage[m.index()] as usize, r + 1);
            }
        }
        // (Here d0 = 0: the row domain keeps axis 1.)
        assert_eq!(ir.layout.domain_axes(Domain::Row), [1]);
        let to = |r: usize, d: Domain| {
            s.round_means[r]
                .iter()
                .filter(|&&m| ir.node(m).domain == d)
                .count()
        };
        assert_eq!(to(0, Domain::Row), 1);
        assert_eq!(
            to(0, Domain::Row) + to(0, Domain::Step),
            s.round_means[0].len()
        );
        assert_eq!(to(1, Domain::Step), s.round_means[1].len());
        assert_eq!(s.passes.len(), p.passes().len());
        let (slots, len) = s.round_slots(&ir, 0);
        assert_eq!(slots.len(), s.round_means[0].len());
        assert!(len >= 32);
        // Every node's stage is at least its operands' (a stage never needs a later round).
        for v in ir.ids() {
            for o in ir.node(v).op.operands() {
                assert!(s.stage[o.index()] <= s.stage[v.index()]);
            }
        }
    }
}
