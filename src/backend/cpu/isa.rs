//! Which instruction set the chunk loop runs with: detected at run time, or forced with
//! `MULO_CPU_ISA`.

/// The instruction set the chunk loop runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// AVX-512F (with AVX2 and FMA; x86-64): the dense layers in 512-bit register blocks.
    Avx512,
    /// AVX2 with FMA (x86-64).
    Avx2,
    /// Whatever the compilation target guarantees; no fused multiply-add.
    Portable,
}

impl Isa {
    /// The best instruction set this CPU supports, or the one `MULO_CPU_ISA` names
    /// (`avx512`, `avx2`, `portable`; see [`Isa::name`]) if the CPU supports that one.
    pub fn detect() -> Isa {
        let best = Self::best();
        let chosen = match std::env::var("MULO_CPU_ISA").as_deref() {
            Ok("avx512") => Isa::Avx512,
            Ok("avx2") => Isa::Avx2,
            Ok("portable") => Isa::Portable,
            _ => best,
        };
        if best.supports(chosen) {
            chosen
        } else {
            best
        }
    }

    /// Whether a CPU with this instruction set can run `other`.
    pub(super) fn supports(self, other: Isa) -> bool {
        match other {
            Isa::Portable => true,
            Isa::Avx2 => matches!(self, Isa::Avx2 | Isa::Avx512),
            Isa::Avx512 => self == Isa::Avx512,
        }
    }

    /// Whether this CPU can run `self`.
    pub fn available(self) -> bool {
        Self::best().supports(self)
    }

    /// The name `MULO_CPU_ISA` takes: `avx512`, `avx2` or `portable`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }

    /// Every instruction set path, widest first.
    pub const ALL: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Portable];

    pub(super) fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if avx2 && is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }
}
