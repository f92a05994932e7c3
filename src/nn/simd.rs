//! One loop, compiled for each vector unit and chosen at run time.
//!
//! The host kernels' elementwise loops (GELU, softmax, the depthwise taps) are plain
//! scalar Rust that LLVM vectorises. Built for the x86-64 baseline they get 4 lanes;
//! [`widest!`] compiles the same body again for AVX2 + FMA (8 lanes) and for AVX-512
//! (16 lanes) and calls the widest that the CPU has. Each lane computes what the
//! scalar code does, in the same order (Rust never contracts `a * b + c` by itself),
//! so every width gives the same bits. On aarch64 the baseline already has NEON.

/// Defines `fn NAME(ARGS)` that runs `BODY` built for the widest vector unit this CPU
/// has: AVX-512F, AVX2 + FMA, or the target's baseline.
macro_rules! widest {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn portable($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    portable($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    portable($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: AVX-512F (and with it AVX2 and FMA) was detected on this CPU.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: both features were detected on this CPU just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            portable($($arg),*)
        }
    };
}

pub(crate) use widest;
