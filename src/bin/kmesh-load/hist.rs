//! Log-linear latency histogram (HDR-style).
//!
//! Hand-rolled rather than the `hdrhistogram` crate: the suite needs only
//! record, merge and quantile, which fit in this file, and the bucket layout
//! (128 sub-buckets per power of two, so a reported value is within 0.8 % of
//! the recorded one) is all the precision a microsecond-scale loopback
//! measurement can use.

/// Values below 2^P are stored exactly; above, each octave has 2^(P-1)
/// buckets.
const P: u32 = 7;
const HALF: u64 = 1 << (P - 1);
/// Covers every u64 value: the largest shift is 64 - P.
const BUCKETS: usize = ((64 - P as usize + 1) * HALF as usize) + HALF as usize;

#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            sum: 0,
        }
    }
}

fn index(v: u64) -> usize {
    if v < (1 << P) {
        return v as usize;
    }
    let e = 63 - v.leading_zeros();
    // Drop enough low bits that the rest lies in [2^(P-1), 2^P).
    let shift = e + 1 - P;
    (shift as u64 * HALF + (v >> shift)) as usize
}

/// Midpoint of the values that land in bucket `i`.
fn value(i: usize) -> u64 {
    let i = i as u64;
    if i < (1 << P) {
        return i;
    }
    let shift = i / HALF - 1;
    let low = (i % HALF + HALF) << shift;
    low + ((1u64 << shift) >> 1)
}

impl Histogram {
    pub fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.total += 1;
        self.sum += u128::from(v);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.sum += other.sum;
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        self.sum as f64 / self.total as f64
    }

    /// Value at quantile `q` in [0, 1]: the smallest bucket whose cumulative
    /// count reaches ceil(q * n).
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return value(i);
            }
        }
        unreachable!("rank <= total")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_precise() {
        let mut prev = 0;
        for v in (0..200_000u64).chain([u64::MAX / 3, u64::MAX]) {
            let i = index(v);
            assert!(i >= prev && i < BUCKETS, "v={v} i={i}");
            prev = i;
            let err = (value(i) as f64 - v as f64).abs() / (v.max(1) as f64);
            assert!(err <= 0.008, "v={v} reported {} ({err})", value(i));
        }
    }

    #[test]
    fn quantiles_of_uniform_values() {
        let mut h = Histogram::default();
        for v in 1..=10_000u64 {
            h.record(v * 1000);
        }
        let near = |q: f64, want: f64| {
            let got = h.quantile(q) as f64;
            assert!((got - want).abs() / want < 0.01, "q={q}: {got} vs {want}");
        };
        near(0.5, 5_000_000.0);
        near(0.9, 9_000_000.0);
        near(0.99, 9_900_000.0);
        assert!((h.mean() - 5_000_500.0).abs() < 1.0);
        let mut m = Histogram::default();
        m.merge(&h);
        m.merge(&h);
        assert_eq!(m.count(), 20_000);
        assert_eq!(m.quantile(0.5), h.quantile(0.5));
    }
}
