//! The packed model program (`mulo_model.cu`) compiled for the CPU with the emulation layer
//! of [`super::emulation`], run in a subprocess on relocatable regions.

use super::emulation::{command, compile, constants_loader, poisoned, Seeds, EMULATION, LAUNCH};
use mulo::backend::cuda::manifest::{constants_json, ConstantJson};
use mulo::backend::cuda::packed::{PackedModel, TABLE_ENTRY_BYTES};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The generated model program compiled for the CPU. A step runs it in a subprocess on
/// *regions* (each its own `malloc`): the table's addresses are relocatable, `(r + 1) << 40 |
/// byte offset` for region `r` ([`reloc`]), and the program turns them into pointers into its
/// regions before the launches, so the kernels see nothing but the table's pointers.
pub struct EmulatedProgram {
    dir: PathBuf,
    exe: PathBuf,
    n_tensors: usize,
    n_slots: usize,
    seeds: Seeds,
}

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// The relocatable address of byte `offset` of region `region`.
pub fn reloc(region: usize, offset: u64) -> u64 {
    ((region as u64 + 1) << 40) | offset
}

impl EmulatedProgram {
    pub fn new(model: &PackedModel) -> Self {
        Self::with_constants(model, |_| {})
    }

    /// [`new`](Self::new), the manifest's `constants` edited by `edit` before the program is
    /// built to fill them (a planted defect).
    pub fn with_constants(model: &PackedModel, edit: impl FnOnce(&mut Vec<ConstantJson>)) -> Self {
        let dir = super::temp_dir(&format!(
            "packed-emu-{}",
            NEXT_DIR.fetch_add(1, Ordering::SeqCst)
        ));
        let source = model.source().unwrap();
        std::fs::write(dir.join("mulo_model.cu"), &source).unwrap();
        // The manifest's `constants` (what `PackedModel::manifest` writes).
        let mut constants = constants_json(&model.constant_arrays(&source).unwrap());
        edit(&mut constants);
        let n = model.tensors.len();
        let mut main = String::from(EMULATION);
        main.push_str("#include \"mulo_model.cu\"\n");
        main.push_str(LAUNCH);
        main.push_str(&constants_loader(&dir, &source, &constants));
        main.push_str("struct Args { const MuloTensor* table; const idx_t* starts; int n; };\n");
        for (s, slot) in model.slots.iter().enumerate() {
            main.push_str(&format!(
                "static void call_{s}(void* p) {{ Args* x = (Args*)p; {}(x->table, x->starts, x->n); }}\n",
                slot.name
            ));
        }
        let slots = model.slots.len();
        main.push_str(&format!(
            r#"static unsigned long long rd(FILE* f) {{ unsigned long long v; if (fread(&v, 8, 1, f) != 1) exit(3); return v; }}
int main(int argc, char** argv) {{
    mulo_fill_constants();
    FILE* f = fopen(argv[1], "rb");
    const unsigned long long nr = rd(f);
    std::vector<char*> region(nr); std::vector<unsigned long long> size(nr);
    for (unsigned long long r = 0; r < nr; ++r) {{
        size[r] = rd(f); region[r] = (char*)malloc(size[r] ? size[r] : 1);
        if (fread(region[r], 1, size[r], f) != size[r]) return 3;
    }}
    const int n = {n};
    MuloTensor* table = (MuloTensor*)malloc({tb}); if (fread(table, 1, {tb}, f) != {tb}) return 3;
    idx_t* starts = (idx_t*)malloc({sb} * 8); if (fread(starts, 8, {sb}, f) != {sb}) return 3;
    fclose(f);
    for (int t = 0; t < n; ++t) {{
        unsigned long long* addr = (unsigned long long*)&table[t];
        for (int k = 0; k < {words}; ++k) {{
            if (k == 9 || k == 10 || addr[k] == 0) continue; // the scalars and plan, not addresses
            const unsigned long long r = (addr[k] >> 40) - 1, off = addr[k] & ((1ull << 40) - 1);
            if (r >= nr || off > size[r]) return 4;
            addr[k] = (unsigned long long)(region[r] + off);
        }}
    }}
    Args a; a.table = table; a.starts = starts; a.n = n;
    const int first = argc > 3 ? atoi(argv[3]) : 0, end = argc > 4 ? atoi(argv[4]) : {slots};
"#,
            tb = (n * TABLE_ENTRY_BYTES).max(1),
            words = TABLE_ENTRY_BYTES / 8,
            sb = slots * (n + 1),
        ));
        for s in 0..slots {
            main.push_str(&format!(
                "    if ({s} >= first && {s} < end) {{ const idx_t grid = starts[{s} * ({n} + 1) + {n}]; if (grid > 0) mulo_launch((unsigned)grid, call_{s}, &a); }}\n"
            ));
        }
        main.push_str(
            "    FILE* o = fopen(argv[2], \"wb\");\n    for (unsigned long long r = 0; r < nr; ++r) fwrite(region[r], 1, size[r], o);\n    fclose(o);\n    return 0;\n}\n",
        );
        std::fs::write(dir.join("main.cpp"), main).unwrap();
        let exe = compile(&dir);
        EmulatedProgram {
            dir,
            exe,
            n_tensors: n,
            n_slots: slots,
            seeds: Seeds::default(),
        }
    }

    /// Runs one step on `regions` (f32 values), updating them in place; after them come
    /// poisoned regions of the byte sizes in `extra` (scratch, partials: NaN bytes, as a
    /// previous step might have left them), not returned.
    pub fn run(&self, regions: &mut [Vec<f32>], extra: &[usize], table: &[u8], starts: &[i64]) {
        let mut bytes: Vec<Vec<u8>> = regions
            .iter()
            .map(|r| r.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        bytes.extend(extra.iter().map(|&len| poisoned(len)));
        self.run_slots(&mut bytes, table, starts, 0..self.n_slots);
        for (r, b) in regions.iter_mut().zip(bytes) {
            *r = b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
        }
    }

    /// Runs the launches of `slots` (a stage of a staged model, or all of them) on `regions`
    /// (raw bytes, every one written back: scratch, partials and round buffers persist between
    /// the stages of a step; the caller poisons them at a step's start). Each run takes the
    /// next block-order seed.
    pub fn run_slots(
        &self,
        regions: &mut [Vec<u8>],
        table: &[u8],
        starts: &[i64],
        slots: std::ops::Range<usize>,
    ) {
        assert_eq!(table.len(), self.n_tensors * TABLE_ENTRY_BYTES);
        assert_eq!(starts.len(), self.n_slots * (self.n_tensors + 1));
        let mut bytes = Vec::new();
        bytes.extend((regions.len() as u64).to_le_bytes());
        for r in regions.iter() {
            bytes.extend((r.len() as u64).to_le_bytes());
            bytes.extend_from_slice(r);
        }
        bytes.extend_from_slice(table);
        starts.iter().for_each(|x| bytes.extend(x.to_le_bytes()));
        let (inp, outp) = (self.dir.join("in.bin"), self.dir.join("out.bin"));
        std::fs::write(&inp, &bytes).unwrap();
        let seed = self.seeds.next();
        let status = command(&self.exe, seed)
            .arg(&inp)
            .arg(&outp)
            .arg(slots.start.to_string())
            .arg(slots.end.to_string())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "emulated launches failed: {status} (MULO_EMU_SEED={seed})"
        );
        eprintln!("emulated launches {slots:?}: MULO_EMU_SEED={seed}");
        let out = std::fs::read(&outp).unwrap();
        let mut at = 0;
        for r in regions.iter_mut() {
            let len = r.len();
            r.copy_from_slice(&out[at..at + len]);
            at += len;
        }
        assert_eq!(at, out.len(), "the program wrote back every region");
    }
}

impl Drop for EmulatedProgram {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
