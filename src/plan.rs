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
    let mut level = vec![0u32; ir.nodes.len()];
    for (i, node) in ir.nodes.iter().enumerate() {
        let base = node
            .op
            .operands()
            .iter()
            .map(|o| level[o.index()])
            .max()
            .unwrap_or(0);
        level[i] = base + is_elem_mean(ir, ValueId(i as u32)) as u32;
    }
    level
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
}
