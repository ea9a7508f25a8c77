//! One topic's log: a directory of segment files named by the offset of
//! their first record, the in-memory index of every record (offset →
//! segment, position, length) so reads never rescan files, appends, and
//! rolling to a new segment.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::file::{LogFile, TMP_SUFFIX, sync_dir};
use super::options::{Fsync, Options};
use super::record::{RecordHead, encode_message, escape_name};
use super::scan::{Report, clean_leftovers, repair, scan};
use crate::message::Message;

const SEGMENT_EXT: &str = ".ndjson";

/// Where one record lives.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub offset: u64,
    pub pos: u32,
    pub len: u32,
}

pub struct Segment {
    /// Offset of its first record (or, while empty, of the next one).
    pub base: u64,
    pub file: Arc<LogFile>,
    /// Ascending; gaps appear where records were quarantined or compacted.
    pub entries: Vec<Entry>,
    /// Append times of its oldest and newest record.
    pub first_at: Option<u64>,
    pub last_at: Option<u64>,
}

impl Segment {
    pub fn bytes(&self) -> u64 {
        self.file.len()
    }

    pub fn last_offset(&self) -> Option<u64> {
        self.entries.last().map(|e| e.offset)
    }
}

pub fn segment_name(base: u64) -> String {
    format!("{base:020}{SEGMENT_EXT}")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_EXT)?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

pub struct Topic {
    pub name: Arc<str>,
    pub dir: PathBuf,
    /// Ascending by base; the last one takes appends.
    pub segments: Vec<Segment>,
    /// The offset the next record gets. Never reused, even after records
    /// are deleted: group positions refer to offsets.
    pub next: u64,
    /// Records below this offset may be delivered. With `fsync=always` it
    /// trails `next` until the bytes are synced, so no consumer acts on a
    /// record that a power failure could still take back.
    pub visible: u64,
}

impl Topic {
    /// A new topic directory whose first offset is `next`.
    pub fn create(topics_dir: &Path, name: &str, next: u64, fsync: Fsync) -> io::Result<Topic> {
        let dir = topics_dir.join(escape_name(name));
        std::fs::create_dir_all(&dir)?;
        if fsync != Fsync::Never {
            sync_dir(topics_dir)?;
        }
        let mut topic = Topic {
            name: name.into(),
            dir,
            segments: Vec::new(),
            next,
            visible: next,
        };
        topic.start_segment(fsync)?;
        Ok(topic)
    }

    /// Loads a topic directory, checking every record. With `report.fix`
    /// damaged records are quarantined and a torn tail is cut off, and the
    /// last segment is opened for appending.
    pub fn load(dir: &Path, name: &str, report: &mut Report) -> io::Result<Topic> {
        clean_leftovers(dir, report)?;
        let mut bases = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            match parse_segment_name(file_name) {
                Some(base) => bases.push(base),
                None if path.exists() && !file_name.ends_with(TMP_SUFFIX) => tracing::warn!(
                    file = %path.display(),
                    "file log: ignoring a file that is not a segment"
                ),
                None => {}
            }
        }
        bases.sort_unstable();
        let mut topic = Topic {
            name: name.into(),
            dir: dir.to_path_buf(),
            segments: Vec::with_capacity(bases.len()),
            next: 0,
            visible: 0,
        };
        // Offsets must rise across the whole topic; anything else is damage.
        let mut previous: Option<u64> = None;
        for (i, &base) in bases.iter().enumerate() {
            let path = dir.join(segment_name(base));
            let check_from = previous;
            let mut scanned = scan(&path, check_record(name, base, check_from))?;
            if repair(&path, &scanned, report)? {
                scanned = scan(&path, check_record(name, base, check_from))?;
            }
            let writable = report.fix && i + 1 == bases.len();
            let file = Arc::new(LogFile::open(&path, writable)?);
            let mut segment = Segment {
                base,
                file,
                entries: Vec::with_capacity(scanned.good.len()),
                first_at: None,
                last_at: None,
            };
            for (line, (offset, at)) in &scanned.good {
                segment.entries.push(Entry {
                    offset: *offset,
                    pos: line.pos as u32,
                    len: line.len,
                });
                segment.first_at = Some(segment.first_at.map_or(*at, |f| f.min(*at)));
                segment.last_at = Some(segment.last_at.map_or(*at, |l| l.max(*at)));
            }
            if let Some(last) = segment.last_offset() {
                previous = Some(last);
            }
            topic.next = topic.next.max(base).max(previous.map_or(0, |p| p + 1));
            topic.segments.push(segment);
        }
        topic.visible = topic.next;
        Ok(topic)
    }

    /// The lowest offset still held (or `next` if none is).
    pub fn low(&self) -> u64 {
        self.segments
            .iter()
            .find_map(|s| s.entries.first())
            .map_or(self.next, |e| e.offset)
    }

    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(Segment::bytes).sum()
    }

    pub fn records(&self) -> usize {
        self.segments.iter().map(|s| s.entries.len()).sum()
    }

    /// How many records it holds at `offset` or past it.
    pub fn records_from(&self, offset: u64) -> usize {
        self.segments
            .iter()
            .map(|s| s.entries.len() - s.entries.partition_point(|e| e.offset < offset))
            .sum()
    }

    /// Where the record at `offset` lives, if it is still held.
    pub fn locate(&self, offset: u64) -> Option<(Arc<LogFile>, Entry)> {
        let index = self.segments.partition_point(|s| s.base <= offset);
        let segment = &self.segments[index.checked_sub(1)?];
        let at = segment
            .entries
            .binary_search_by_key(&offset, |e| e.offset)
            .ok()?;
        Some((segment.file.clone(), segment.entries[at]))
    }

    /// Up to `max` visible records from `from` on, in offset order.
    pub fn read_from(&self, from: u64, max: usize) -> Vec<(Arc<LogFile>, Entry)> {
        let mut out = Vec::new();
        let first = self.segments.partition_point(|s| s.base <= from).max(1) - 1;
        for segment in self.segments.iter().skip(first) {
            let start = segment.entries.partition_point(|e| e.offset < from);
            for entry in &segment.entries[start..] {
                if out.len() >= max || entry.offset >= self.visible {
                    return out;
                }
                out.push((segment.file.clone(), *entry));
            }
        }
        out
    }

    /// Appends messages, one write per segment touched, and returns the
    /// sync tickets. Offsets are taken only for what was written.
    pub fn append(
        &mut self,
        messages: &[&Message],
        options: &Options,
        at: u64,
    ) -> io::Result<Vec<(Arc<LogFile>, u64)>> {
        let mut tickets = Vec::new();
        if self.segments.is_empty() {
            self.start_segment(options.fsync)?;
        }
        let mut batch = Batch::default();
        for message in messages {
            let offset = self.next + batch.entries.len() as u64;
            let line = encode_message(offset, at, message);
            let active = self.segments.last().expect("a segment").bytes();
            let after = active + batch.text.len() as u64 + line.len() as u64;
            if after > options.segment_bytes && active + batch.text.len() as u64 > 0 {
                // Flushing moves `next` to this record's offset, so the line
                // stays valid in the new segment.
                self.flush(&mut batch, at, &mut tickets)?;
                self.roll(options.fsync)?;
            }
            batch.push(offset, line);
        }
        self.flush(&mut batch, at, &mut tickets)?;
        Ok(tickets)
    }

    fn flush(
        &mut self,
        batch: &mut Batch,
        at: u64,
        tickets: &mut Vec<(Arc<LogFile>, u64)>,
    ) -> io::Result<()> {
        if batch.entries.is_empty() {
            return Ok(());
        }
        let segment = self.segments.last_mut().expect("a segment");
        let start = segment.file.len();
        let ticket = segment.file.append(batch.text.as_bytes())?;
        for (offset, pos, len) in batch.entries.drain(..) {
            segment.entries.push(Entry {
                offset,
                pos: (start + pos) as u32,
                len,
            });
            self.next = offset + 1;
        }
        segment.first_at.get_or_insert(at);
        segment.last_at = Some(at);
        tickets.push((segment.file.clone(), ticket));
        batch.text.clear();
        Ok(())
    }

    /// Closes the active segment (synced, so everything before the new one
    /// is durable) and starts a new one at `next`. No-op while it is empty.
    pub fn roll(&mut self, fsync: Fsync) -> io::Result<()> {
        if let Some(active) = self.segments.last() {
            if active.entries.is_empty() && active.base == self.next {
                return Ok(());
            }
            if fsync != Fsync::Never {
                active.file.sync()?;
            }
        }
        self.start_segment(fsync)
    }

    fn start_segment(&mut self, fsync: Fsync) -> io::Result<()> {
        let path = self.dir.join(segment_name(self.next));
        let file = LogFile::create(&path)?;
        if fsync != Fsync::Never {
            sync_dir(&self.dir)?;
        }
        self.segments.push(Segment {
            base: self.next,
            file: Arc::new(file),
            entries: Vec::new(),
            first_at: None,
            last_at: None,
        });
        Ok(())
    }
}

/// Lines of one segment write, with their offsets and places in `text`.
#[derive(Default)]
struct Batch {
    text: String,
    entries: Vec<(u64, u64, u32)>,
}

impl Batch {
    fn push(&mut self, offset: u64, line: String) {
        self.entries
            .push((offset, self.text.len() as u64, line.len() as u32));
        self.text.push_str(&line);
    }
}

/// The check of one segment line: a record of this topic whose offset is
/// at least the segment's base and above every earlier one.
fn check_record(
    topic: &str,
    base: u64,
    previous: Option<u64>,
) -> impl FnMut(&str) -> Result<(u64, u64), String> {
    let mut previous = previous;
    move |text| {
        let head: RecordHead =
            serde_json::from_str(text).map_err(|e| format!("not a valid record: {e}"))?;
        if head.topic != topic {
            return Err(format!(
                "record of topic `{}` in the log of `{topic}`",
                head.topic
            ));
        }
        if head.offset == u64::MAX {
            // The offset after it could not be numbered.
            return Err(format!("offset {} out of range", head.offset));
        }
        if head.offset < base || previous.is_some_and(|p| head.offset <= p) {
            return Err(format!(
                "offset {} out of order (segment starts at {base}, previous record {})",
                head.offset,
                previous.map_or("none".into(), |p| p.to_string())
            ));
        }
        previous = Some(head.offset);
        Ok((head.offset, head.at))
    }
}
