//! Making sure fetching a partition from a committed offset really starts
//! there.
//!
//! Kafka answers a fetch from offset N with the record batch that holds N
//! (the client drops the records before N). tansu 0.6.0 answers with the
//! batches that *begin* at or after N, so a commit inside a batch — every
//! commit of a member that settled part of what one publish wrote — makes
//! the next owner skip the rest of that batch, or stall on a partition whose
//! only batch holds N. So a member that starts a partition at a committed
//! offset watches what arrives first: a record at or before the start shows
//! the batch holding it is on its way; a later record, or silence while the
//! broker reports records past the start, means fetching must begin further
//! back (twice as far each time, never before the log's start), with the
//! records before the start dropped as usual. On Kafka the first record is
//! the start itself, and nothing changes. (A member never pauses a
//! partition for the same reason, see [`super::consumer::run`].)

use std::time::{Duration, Instant};

/// How long a partition may stay silent, while the broker reports records
/// past the start, before fetching begins further back.
pub const SILENCE: Duration = Duration::from_millis(500);

/// A start not yet confirmed by a record at or before it.
#[derive(Debug, Clone)]
pub struct Landing {
    /// The committed offset: the first to hand out.
    start: i64,
    /// Where fetching begins now.
    from: i64,
    /// When fetching began there.
    since: Instant,
}

/// What the first records say about the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// At or before the start: the start is reached; carry on.
    Landed,
    /// Past the start: begin fetching at this offset instead and drop the
    /// record (it comes again).
    FetchFrom(i64),
    /// Past the start, but fetching already begins at the log's start: the
    /// offsets between are gone (compacted, or control records); carry on.
    Gap,
}

impl Landing {
    pub fn new(start: i64) -> Self {
        Landing {
            start,
            from: start,
            since: Instant::now(),
        }
    }

    /// Judges the first record to arrive, `offset`, given the log's first
    /// offset, `log_start`.
    pub fn arrived(&mut self, offset: i64, log_start: i64) -> Arrival {
        if offset <= self.start {
            return Arrival::Landed;
        }
        match self.further_back(log_start) {
            Some(from) => Arrival::FetchFrom(from),
            None => Arrival::Gap,
        }
    }

    /// Judges silence: where to begin fetching instead, if nothing arrived
    /// for [`SILENCE`] while the log ends (`log_end`, the high watermark)
    /// past the start.
    pub fn silent(&mut self, log_start: i64, log_end: i64) -> Option<i64> {
        if log_end <= self.start || self.since.elapsed() < SILENCE {
            return None;
        }
        self.further_back(log_start)
    }

    /// Whether the log ends at or before the start: nothing can be skipped,
    /// as what comes next is written after it.
    pub fn at_end(&self, log_end: i64) -> bool {
        log_end >= 0 && log_end <= self.start
    }

    fn further_back(&mut self, log_start: i64) -> Option<i64> {
        let floor = log_start.max(0);
        if self.from <= floor {
            return None;
        }
        let distance = (self.start - self.from).max(8) * 2;
        self.from = (self.start - distance).max(floor);
        self.since = Instant::now();
        Some(self.from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_at_or_before_the_start_confirms_it() {
        assert_eq!(Landing::new(5).arrived(5, 0), Arrival::Landed);
        assert_eq!(Landing::new(5).arrived(3, 0), Arrival::Landed);
    }

    #[test]
    fn a_later_record_moves_the_fetch_back_twice_as_far_each_time() {
        let mut landing = Landing::new(100);
        assert_eq!(landing.arrived(120, 0), Arrival::FetchFrom(84));
        assert_eq!(landing.arrived(120, 0), Arrival::FetchFrom(68));
        assert_eq!(landing.arrived(120, 40), Arrival::FetchFrom(40));
        assert_eq!(landing.arrived(120, 40), Arrival::Gap);
    }

    #[test]
    fn silence_moves_the_fetch_back_only_when_records_lie_past_the_start() {
        let mut landing = Landing::new(5);
        landing.since -= SILENCE;
        assert_eq!(landing.silent(0, 5), None, "nothing past the start");
        assert!(landing.at_end(5));
        assert_eq!(landing.silent(0, 16), Some(0));
        assert_eq!(landing.silent(0, 16), None, "just moved");
        landing.since -= SILENCE;
        assert_eq!(landing.silent(0, 16), None, "at the log's start already");
    }
}
