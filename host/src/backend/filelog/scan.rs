//! The startup check: reads a file line by line, sorts lines into good,
//! corrupt and a torn tail, and (when repairing) saves the bad bytes to
//! `DIR/quarantine/…` before truncating or rewriting the file. The same code
//! serves `sluice log check` (report only) and `recover` (report and fix).

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::file::{TMP_SUFFIX, append_synced, sync_dir, tmp_path};
use super::record::unseal;
use crate::message::now_ms;

/// A good line's place in its file.
#[derive(Debug, Clone, Copy)]
pub struct Line {
    pub pos: u64,
    /// Including the newline.
    pub len: u32,
}

/// A line that failed its check, or the torn tail.
pub struct BadLine {
    pub number: usize,
    pub pos: u64,
    pub raw: Vec<u8>,
    pub reason: String,
}

pub struct Scan<T> {
    pub good: Vec<(Line, T)>,
    /// Complete lines (with a newline) that are damaged.
    pub bad: Vec<BadLine>,
    /// Bytes after the last newline: a record whose write was cut short.
    pub torn: Option<BadLine>,
}

impl<T> Scan<T> {
    pub fn is_clean(&self) -> bool {
        self.bad.is_empty() && self.torn.is_none()
    }
}

/// Reads `path`, unseals each line and passes its text to `check`.
pub fn scan<T>(
    path: &Path,
    mut check: impl FnMut(&str) -> Result<T, String>,
) -> io::Result<Scan<T>> {
    let mut reader = BufReader::with_capacity(1 << 16, File::open(path)?);
    let mut result = Scan {
        good: Vec::new(),
        bad: Vec::new(),
        torn: None,
    };
    let mut buffer = Vec::new();
    let (mut pos, mut number) = (0u64, 0usize);
    loop {
        buffer.clear();
        let read = reader.read_until(b'\n', &mut buffer)?;
        if read == 0 {
            break;
        }
        number += 1;
        if buffer.last() != Some(&b'\n') {
            result.torn = Some(BadLine {
                number,
                pos,
                raw: buffer.clone(),
                reason: format!(
                    "torn record at the end of the file ({read} bytes without a newline)"
                ),
            });
            break;
        }
        let content = &buffer[..read - 1];
        match unseal(content).and_then(&mut check) {
            Ok(value) => result.good.push((
                Line {
                    pos,
                    len: read as u32,
                },
                value,
            )),
            Err(reason) => result.bad.push(BadLine {
                number,
                pos,
                raw: content.to_vec(),
                reason,
            }),
        }
        pos += read as u64;
    }
    Ok(result)
}

/// One problem the check found, and what was (or would be) done about it.
#[derive(Debug, Clone)]
pub struct Finding {
    /// Relative to the log directory.
    pub file: String,
    pub line: Option<usize>,
    pub problem: String,
    pub action: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}; {}", self.file, self.problem, self.action),
            None => write!(f, "{}: {}; {}", self.file, self.problem, self.action),
        }
    }
}

/// What a check or recovery found. `fix` says whether actions are done or
/// only described.
pub struct Report {
    pub root: PathBuf,
    pub fix: bool,
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn new(root: &Path, fix: bool) -> Self {
        Report {
            root: root.to_path_buf(),
            fix,
            findings: Vec::new(),
        }
    }

    pub fn relative(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .display()
            .to_string()
    }

    /// Records a finding; `done` and `planned` word the action for a
    /// recovery and for a check.
    pub fn add(
        &mut self,
        path: &Path,
        line: Option<usize>,
        problem: String,
        done: &str,
        planned: &str,
    ) {
        let action = if self.fix { done } else { planned };
        self.findings.push(Finding {
            file: self.relative(path),
            line,
            problem,
            action: action.to_string(),
        });
    }
}

/// Reports damaged lines and a torn tail of `path`; when fixing, saves them
/// to the quarantine file first (so a crash midway loses nothing), then
/// rewrites the file without them. Returns whether the file changed.
pub fn repair<T>(path: &Path, scan: &Scan<T>, report: &mut Report) -> io::Result<bool> {
    if scan.is_clean() {
        return Ok(false);
    }
    let quarantine = report.root.join("quarantine").join(report.relative(path));
    let shown = report.relative(&quarantine);
    for bad in &scan.bad {
        report.add(
            path,
            Some(bad.number),
            bad.reason.clone(),
            &format!("moved to {shown}"),
            &format!("`recover` moves it to {shown}"),
        );
    }
    if let Some(torn) = &scan.torn {
        report.add(
            path,
            Some(torn.number),
            torn.reason.clone(),
            &format!("truncated (the bytes are kept in {shown})"),
            "`recover` truncates it",
        );
    }
    if !report.fix {
        return Ok(false);
    }
    let mut saved = String::new();
    for bad in scan.bad.iter().chain(&scan.torn) {
        let mut entry = serde_json::json!({
            "file": report.relative(path),
            "line": bad.number,
            "byte": bad.pos,
            "reason": bad.reason,
            "quarantined_ms": now_ms(),
        });
        match std::str::from_utf8(&bad.raw) {
            Ok(text) => entry["raw"] = text.into(),
            Err(_) => entry["raw_b64"] = BASE64.encode(&bad.raw).into(),
        }
        saved.push_str(&entry.to_string());
        saved.push('\n');
    }
    append_synced(&quarantine, saved.as_bytes())?;

    if scan.bad.is_empty() {
        let torn = scan.torn.as_ref().expect("not clean");
        let file = std::fs::OpenOptions::new().write(true).open(path)?;
        file.set_len(torn.pos)?;
        file.sync_all()?;
    } else {
        let original = std::fs::read(path)?;
        let mut kept = Vec::with_capacity(original.len());
        for (line, _) in &scan.good {
            let start = line.pos as usize;
            kept.extend_from_slice(&original[start..start + line.len as usize]);
        }
        let tmp = tmp_path(path);
        std::fs::write(&tmp, &kept)?;
        File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(path.parent().unwrap_or(Path::new(".")))?;
    }
    Ok(true)
}

/// Reports (and when fixing, removes) temporary files a crash left in `dir`.
pub fn clean_leftovers(dir: &Path, report: &mut Report) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_tmp = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(TMP_SUFFIX));
        if is_tmp && path.is_file() {
            if report.fix {
                std::fs::remove_file(&path)?;
            }
            report.add(
                &path,
                None,
                "temporary file left by an interrupted write or compaction".into(),
                "removed",
                "`recover` removes it",
            );
        }
    }
    Ok(())
}
