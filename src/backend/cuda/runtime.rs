//! Host runtime (placeholder; filled in below).
