//! Stage timings of one apply, for the debug log: where an apply's time
//! goes, measured in the daemon itself.

/// Stage durations of one apply, for the debug log.
pub(super) struct StageClock {
    last: std::time::Instant,
    laps: Vec<(&'static str, std::time::Duration)>,
}

impl StageClock {
    pub(super) fn new() -> Self {
        StageClock {
            last: std::time::Instant::now(),
            laps: Vec::with_capacity(8),
        }
    }

    pub(super) fn lap(&mut self, stage: &'static str) {
        let now = std::time::Instant::now();
        self.laps.push((stage, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for StageClock {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        for (i, (stage, d)) in self.laps.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{stage} {:.2} ms", d.as_secs_f64() * 1e3)?;
        }
        Ok(())
    }
}
