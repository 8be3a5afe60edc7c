//! Measurements: what one request produced ([`Outcome`]), the per-worker [`Recorder`] that users
//! write into without any lock, the [`Aggregate`] that merges recorders on each reporting tick,
//! and the plain-data [`Summary`] that the report modules render.
//!
//! Every request has exactly one outcome: a success, or a failure with one [`Reason`]. Latencies
//! go into HdrHistograms (microseconds, 3 significant digits), one per (method, name) row.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The row a request is counted under: its method and its name (default: the path).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowId {
    pub method: String,
    pub name: String,
}

impl RowId {
    pub fn new(method: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            method: method.into(),
            name: name.into(),
        }
    }
}

/// Why a request failed. Stable, short and free of ports or addresses, so that the failures
/// table groups like with like instead of growing a row per connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The target answered with status >= 400.
    Status(u16),
    /// Connection refused.
    Refused,
    /// Connection reset by the peer.
    Reset,
    /// HTTP/2: the server reset the request's stream (RST_STREAM).
    StreamReset,
    /// The connection closed before a complete response arrived.
    Closed,
    /// Connecting took longer than the connect timeout.
    ConnectTimeout,
    /// The request (or reading its body) took longer than its timeout.
    Timeout,
    /// The host name did not resolve.
    Dns,
    /// The name lookup took longer than the connect timeout, or the resolver timed out.
    DnsTimeout,
    /// TLS handshake or certificate failure, and which.
    Tls(&'static str),
    /// Any other connect error.
    Connect,
    /// No socket could be opened: the process is at its open-files limit (`ulimit -n`).
    OpenFiles,
    /// The response body could not be read.
    Body,
    /// The response was not valid HTTP.
    Protocol,
    /// The body was longer than `--max-body`.
    BodyTooLarge,
    /// More redirects than `--max-redirects`.
    RedirectLimit,
    /// A hook raised an error (or hit the sandbox's limits). The text says which hook and why.
    Script(String),
    /// A hook was stopped by the sandbox: its instruction budget (CPU) or memory limit.
    ScriptLimit(String),
    /// `after_response` returned `false, "why"`.
    Rejected(String),
    /// The request was still in flight when the run ended and the grace period ran out.
    Aborted,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Status(code) => write!(f, "HTTP {code}"),
            Reason::Refused => f.write_str("connection refused"),
            Reason::Reset => f.write_str("connection reset"),
            Reason::StreamReset => f.write_str("stream reset"),
            Reason::Closed => f.write_str("connection closed before response"),
            Reason::ConnectTimeout => f.write_str("connect timeout"),
            Reason::Timeout => f.write_str("request timeout"),
            Reason::Dns => f.write_str("dns error"),
            Reason::DnsTimeout => f.write_str("dns timeout"),
            Reason::Tls(what) => write!(f, "tls error: {what}"),
            Reason::Connect => f.write_str("connect error"),
            Reason::OpenFiles => f.write_str("too many open files (ulimit -n)"),
            Reason::Body => f.write_str("error reading body"),
            Reason::Protocol => f.write_str("protocol error"),
            Reason::BodyTooLarge => f.write_str("body too large"),
            Reason::RedirectLimit => f.write_str("redirect limit"),
            Reason::Script(why) => write!(f, "script error: {why}"),
            Reason::ScriptLimit(why) => write!(f, "script limit: {why}"),
            Reason::Rejected(why) => f.write_str(why),
            Reason::Aborted => f.write_str("aborted: run ended before the response"),
        }
    }
}

impl Reason {
    /// The text a script made part of this reason (`error(...)`'s message, what
    /// `after_response` returned), if it has any: only such reasons can vary without end.
    fn script_text(&mut self) -> Option<&mut String> {
        match self {
            Reason::Script(why) | Reason::ScriptLimit(why) | Reason::Rejected(why) => Some(why),
            _ => None,
        }
    }

    fn has_script_text(&self) -> bool {
        matches!(self, Reason::Script(_) | Reason::ScriptLimit(_) | Reason::Rejected(_))
    }

    /// The overflow reason of the same class (see [`OVERFLOW_REASON`]).
    fn overflow(&self) -> Reason {
        let text = OVERFLOW_REASON.to_string();
        match self {
            Reason::ScriptLimit(_) => Reason::ScriptLimit(text),
            Reason::Rejected(_) => Reason::Rejected(text),
            _ => Reason::Script(text),
        }
    }
}

/// How many characters of a failure reason's text or of a check name are kept: a longer one is
/// cut there (on a character boundary) and ends with `…`, so messages that differ only past
/// the cut share a row.
pub const MAX_TEXT_CHARS: usize = 200;

/// Where [`MAX_TEXT_CHARS`] cuts `text`, if it is longer.
fn cut_at(text: &str) -> Option<usize> {
    // Up to MAX_TEXT_CHARS bytes is at most that many characters: no need to count them.
    if text.len() <= MAX_TEXT_CHARS {
        return None;
    }
    text.char_indices().nth(MAX_TEXT_CHARS).map(|(at, _)| at)
}

/// Cuts `text` to [`MAX_TEXT_CHARS`] characters and `…`, in place: a failure reason's text, a
/// check name, a request name.
pub fn shorten(text: &mut String) {
    if let Some(at) = cut_at(text) {
        text.truncate(at);
        text.push('…');
    }
}

/// A histogram in HdrHistogram's interchange encoding (V2, deflate-compressed), in base64: what
/// HdrHistogram's own tools read.
pub fn encode_histogram(h: &Histogram<u64>) -> String {
    use base64::Engine as _;
    let mut bytes = Vec::new();
    // Writing into memory cannot fail.
    use hdrhistogram::serialization::Serializer as _;
    let _ = hdrhistogram::serialization::V2DeflateSerializer::new().serialize(h, &mut bytes);
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Reads what [`encode_histogram`] wrote. Its deflated bytes are inflated here, at most
/// [`HISTOGRAM_MAX`] of them, and the length of the counts its header claims is checked against
/// what they hold before the decoder sees them: the decoder sets aside as much room as the
/// header claims (a result file of a few bytes could ask for gigabytes).
pub fn decode_histogram(text: &str) -> Result<Histogram<u64>, String> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| format!("a histogram is not base64: {e}"))?;
    let plain = inflate_histogram(&bytes)?;
    let mut h: Histogram<u64> = hdrhistogram::serialization::Deserializer::new()
        .deserialize(&mut plain.as_slice())
        .map_err(|e| format!("a histogram does not decode: {e:?}"))?;
    h.auto(true);
    Ok(h)
}

/// The most bytes a histogram of a result file may take once inflated: 30 times the largest
/// stormlight writes (every count of a 3-digit histogram over the whole range, ~0.5 MB).
pub const HISTOGRAM_MAX: usize = 16 << 20;

/// The plain V2 encoding of `bytes`, a V2 one deflated (cookie, length, zlib data) or a plain
/// one, after checking that it holds the counts its header claims. (Cookies and layout:
/// HdrHistogram's V2 encoding, as the `hdrhistogram` crate reads it.)
fn inflate_histogram(bytes: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    const V2: u32 = 0x1c84_9313;
    const V2_DEFLATED: u32 = 0x1c84_9314;
    /// Cookie, counts' length, offset, digits (4 bytes each), lowest, highest, ratio (8 each).
    const HEADER: usize = 40;
    let word = |b: &[u8], at: usize| b.get(at..at + 4).map(|w| u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    let plain = match word(bytes, 0) {
        Some(V2_DEFLATED) => {
            let len = word(bytes, 4).ok_or("a histogram ends within its header")? as usize;
            let deflated = bytes.get(8..).unwrap_or_default();
            let deflated = &deflated[..len.min(deflated.len())];
            let mut plain = Vec::new();
            flate2::read::ZlibDecoder::new(deflated)
                .take(HISTOGRAM_MAX as u64 + 1)
                .read_to_end(&mut plain)
                .map_err(|e| format!("a histogram does not inflate: {e}"))?;
            plain
        }
        Some(V2) => bytes.to_vec(),
        _ => return Err("a histogram is not in HdrHistogram's V2 encoding".into()),
    };
    if plain.len() > HISTOGRAM_MAX {
        return Err(format!(
            "a histogram is larger than {} MiB once inflated",
            HISTOGRAM_MAX >> 20
        ));
    }
    if plain.len() < HEADER || word(&plain, 0) != Some(V2) {
        return Err("a histogram does not decode: no V2 header inside".into());
    }
    let claimed = word(&plain, 4).unwrap_or(u32::MAX) as usize;
    let held = plain.len() - HEADER;
    if claimed > held {
        return Err(format!(
            "a histogram's header claims {claimed} bytes of counts, and it holds {held}"
        ));
    }
    Ok(plain)
}

/// One point of a run's time series: one tick (a second) of requests.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SeriesPoint {
    /// When the tick ended, in seconds since the start.
    pub t_s: f64,
    pub requests: u64,
    pub failures: u64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Users running at the end of the tick.
    pub users: u64,
    /// Response body bytes read in the tick.
    #[serde(default)]
    pub bytes: u64,
    /// The tick's latencies (see [`encode_histogram`]), so series merge exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_hist: Option<String>,
}

/// A fresh latency histogram: microseconds, 3 significant digits, growing as values need.
pub fn new_histogram() -> Histogram<u64> {
    // `new` auto-resizes, so a row only pays for the range its latencies actually reach.
    Histogram::new(3).expect("3 significant digits is a valid histogram precision")
}

/// Counts and latencies of one row (or of the total).
///
/// Two histograms: `service_us` from the moment the request was sent to its end, as measured;
/// `latency_us` what a user of the service would have seen. In a closed model (users in a
/// loop) a stall holds the users back, so it is measured once per user instead of once per
/// request that should have gone out (coordinated omission): `latency_us` records each
/// request corrected as HdrHistogram's `record_correct` does, with the user's expected
/// interval. In the open model it runs from the time the request was scheduled.
#[derive(Debug, Clone)]
pub struct RowStats {
    pub requests: u64,
    pub failures: u64,
    /// Response body bytes read.
    pub bytes: u64,
    pub latency_us: Histogram<u64>,
    pub service_us: Histogram<u64>,
}

impl Default for RowStats {
    fn default() -> Self {
        Self {
            requests: 0,
            failures: 0,
            bytes: 0,
            latency_us: new_histogram(),
            service_us: new_histogram(),
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

impl RowStats {
    fn record(&mut self, outcome: &Outcome) {
        self.requests += 1;
        self.failures += u64::from(outcome.failure.is_some());
        if let Some(elapsed) = outcome.elapsed {
            let us = micros(elapsed);
            let _ = self.service_us.record(us);
            let _ = match outcome.correction {
                Correction::None => self.latency_us.record(us),
                Correction::Interval(every) => self.latency_us.record_correct(us, micros(every)),
                Correction::Queued(waited) => self.latency_us.record(us.saturating_add(micros(waited))),
            };
        }
    }

    pub fn merge(&mut self, other: &RowStats) {
        self.requests += other.requests;
        self.failures += other.failures;
        self.bytes += other.bytes;
        // The histograms auto-resize, so `add` cannot fail on range.
        let _ = self.latency_us.add(&other.latency_us);
        let _ = self.service_us.add(&other.service_us);
    }

    fn fresh_like(&self) -> Self {
        Self {
            requests: 0,
            failures: 0,
            bytes: 0,
            latency_us: Histogram::new_from(&self.latency_us),
            service_us: Histogram::new_from(&self.service_us),
        }
    }
}

/// How a request's latency differs from its service time (see [`RowStats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum Correction {
    /// The same (no expected interval known yet, or requests made inside `scenario`).
    #[default]
    None,
    /// Closed model: the user meant to send one request per this interval.
    Interval(Duration),
    /// Open model: the request waited this long after its scheduled time before it was sent.
    Queued(Duration),
}

/// What happened to one request. `elapsed` is `None` when nothing was sent (a hook failed first).
pub struct Outcome {
    pub elapsed: Option<Duration>,
    pub failure: Option<Reason>,
    pub correction: Correction,
}

/// A worker's recorder: rows are indexed by position, so recording a request for an endpoint
/// whose row is known at load time is a vector index, not a hash lookup.
pub struct Recorder {
    rows: Vec<(Arc<RowId>, RowStats)>,
    index: HashMap<Arc<RowId>, usize>,
    /// Requests started and not yet finished, per row: counted as [`Reason::Aborted`] if the run
    /// is cut off while they are in flight.
    inflight: Vec<u64>,
    /// Keyed by row id rather than index so that errors outside any request (a failing
    /// `on_start`) can be listed without adding a request row. Entries stay from one tick to
    /// the next while they count (see [`Recorder::take`]), so a known reason costs one lookup.
    failures: HashMap<(Arc<RowId>, Reason), u64>,
    /// Responses received over HTTP/1.1 and over HTTP/2.
    protocols: [u64; 2],
    /// `check(value, name)` results: passes and fails per name (kept as `failures` are).
    checks: HashMap<String, [u64; 2]>,
    /// Room to build a long check name's shortened form in without allocating.
    check_key: String,
    /// Errors outside any request (see [`Recorder::error`]).
    errors: u64,
    /// Open model: iterations that found no free user.
    pub dropped: u64,
    /// Script calls the end of the run stopped (see [`Recorder::stuck`]).
    stuck: Vec<String>,
    cap: Arc<NameCap>,
}

/// Script calls listed by name as still running at the end of a run; past this many, only
/// counted.
pub const STUCK_LISTED: usize = 20;

/// What a recorder hands to the aggregator on each tick: the counts since the previous tick.
#[derive(Default)]
pub struct Snapshot {
    pub rows: Vec<(Arc<RowId>, RowStats)>,
    pub failures: Vec<(Arc<RowId>, Reason, u64)>,
    pub protocols: [u64; 2],
    pub checks: Vec<(String, [u64; 2])>,
    pub errors: u64,
    pub dropped: u64,
    pub stuck: Vec<String>,
}

/// The name of the row that requests with names past the cap count under.
pub const OVERFLOW_NAME: &str = "(names past --max-names)";

/// The text of the reason that new failure reasons past the cap count under, in the class of
/// the reason they replace: `script error: (reasons past --max-names)`, `script limit: ...`,
/// and for `after_response`'s own reasons the text alone.
pub const OVERFLOW_REASON: &str = "(reasons past --max-names)";

/// The name that new check names past the cap count under.
pub const OVERFLOW_CHECK: &str = "(checks past --max-names)";

/// The caps on distinct request names, failure reasons and check names (`--max-names` each),
/// shared by every worker's recorder: URLs with ids in them (`/items/123`), or an id in an
/// error message or a check's description, would otherwise make a row each, without end.
#[derive(Debug)]
pub struct NameCap {
    max: usize,
    names: Admitted<RowId>,
    /// Only reasons with text from the script (see [`Reason::has_script_text`]): the others are
    /// few by construction.
    reasons: Admitted<Reason>,
    checks: Admitted<String>,
}

/// What one cap has let in, and whether its warning was given.
#[derive(Debug)]
struct Admitted<T> {
    seen: std::sync::Mutex<std::collections::HashSet<T>>,
    warned: std::sync::atomic::AtomicBool,
}

impl<T> Default for Admitted<T> {
    fn default() -> Self {
        Self {
            seen: Default::default(),
            warned: Default::default(),
        }
    }
}

impl<T: std::hash::Hash + Eq + Clone> Admitted<T> {
    /// Whether `item` may count on its own (it does already, or there is room); the first
    /// time it may not, `warn` is called.
    fn admit(&self, max: usize, item: &T, warn: impl FnOnce()) -> bool {
        let Ok(mut seen) = self.seen.lock() else { return true };
        if seen.contains(item) {
            return true;
        }
        if seen.len() < max {
            seen.insert(item.clone());
            return true;
        }
        drop(seen);
        if !self.warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
            warn();
        }
        false
    }
}

impl NameCap {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            names: Default::default(),
            reasons: Default::default(),
            checks: Default::default(),
        })
    }

    /// Whether `id` may have a row of its own (it has one already, or there is room).
    fn admit(&self, id: &RowId) -> bool {
        self.names.admit(self.max, id, || {
            say!(
                "warning: more than {} distinct request names; from {} {:?} on, new names count under \"{OVERFLOW_NAME}\". \
                 Give requests whose URL carries an id a `name` (e.g. name = \"/items/[id]\"), or raise --max-names.",
                self.max, id.method, id.name
            );
        })
    }

    /// Whether `reason` (shortened already) may be counted as itself: always for reasons
    /// without text from the script.
    fn admit_reason(&self, reason: &Reason) -> bool {
        if !reason.has_script_text() {
            return true;
        }
        self.reasons.admit(self.max, reason, || {
            say!(
                "warning: more than {} distinct failure reasons; from {:?} on, new reasons count under \"{}\". \
                 Keep ids and other changing values out of error() messages and of the reasons after_response \
                 returns, or raise --max-names.",
                self.max,
                reason.to_string(),
                reason.overflow()
            );
        })
    }

    /// Whether the check `name` (shortened already) may be counted under its own name.
    fn admit_check(&self, name: &String) -> bool {
        self.checks.admit(self.max, name, || {
            say!(
                "warning: more than {} distinct check names; from {name:?} on, new names count under \"{OVERFLOW_CHECK}\". \
                 Keep ids and other changing values out of check() descriptions, or raise --max-names.",
                self.max
            );
        })
    }
}

impl Recorder {
    /// A recorder whose first rows are `rows`, in that order (the scenario's static rows), with
    /// no cap on names.
    pub fn new(rows: &[Arc<RowId>]) -> Self {
        Self::with_cap(rows, NameCap::new(usize::MAX))
    }

    /// [`Recorder::new`], with new names counted against `cap`.
    pub fn with_cap(rows: &[Arc<RowId>], cap: Arc<NameCap>) -> Self {
        let mut rec = Self {
            rows: Vec::new(),
            index: HashMap::new(),
            inflight: Vec::new(),
            failures: HashMap::new(),
            protocols: [0; 2],
            checks: HashMap::new(),
            check_key: String::new(),
            errors: 0,
            dropped: 0,
            stuck: Vec::new(),
            cap,
        };
        for row in rows {
            rec.row(row);
        }
        rec
    }

    /// The index of a row, adding it if it is new (names changed by hooks end up here); past
    /// the cap on names, the overflow row's.
    pub fn row(&mut self, id: &Arc<RowId>) -> usize {
        if let Some(&i) = self.index.get(id) {
            return i;
        }
        if !self.cap.admit(id) {
            let overflow = Arc::new(RowId::new("", OVERFLOW_NAME));
            if let Some(&i) = self.index.get(&overflow) {
                return i;
            }
            return self.add_row(overflow);
        }
        self.add_row(id.clone())
    }

    fn add_row(&mut self, id: Arc<RowId>) -> usize {
        let i = self.rows.len();
        self.rows.push((id.clone(), RowStats::default()));
        self.inflight.push(0);
        self.index.insert(id.clone(), i);
        i
    }

    /// Looks a row up by method and name without allocating when it already exists.
    pub fn row_by_name(&mut self, method: &str, name: &str) -> usize {
        // The index is keyed by `Arc<RowId>`; a temporary RowId is the cheapest probe.
        let probe = RowId::new(method, name);
        if let Some(&i) = self.index.get(&probe) {
            return i;
        }
        self.row(&Arc::new(probe))
    }

    pub fn begin(&mut self, row: usize) {
        self.inflight[row] += 1;
    }

    /// Records the outcome of a request started with [`Recorder::begin`].
    pub fn finish(&mut self, row: usize, outcome: Outcome) {
        self.inflight[row] -= 1;
        self.record(row, outcome);
    }

    /// Records an outcome that had no `begin` (nothing was in flight).
    pub fn record(&mut self, row: usize, outcome: Outcome) {
        self.rows[row].1.record(&outcome);
        if let Some(reason) = outcome.failure {
            self.count_failure(self.rows[row].0.clone(), reason, 1);
        }
    }

    /// Lists an error that belongs to no request (a hook outside a request failed): it shows in
    /// the failures table but adds nothing to the request counts.
    pub fn error(&mut self, id: &Arc<RowId>, reason: Reason) {
        self.count_failure(id.clone(), reason, 1);
        self.errors += 1;
    }

    /// Counts `n` failures of row `id` for `reason`: its text shortened, and past the cap on
    /// reasons under the overflow reason of its class.
    fn count_failure(&mut self, id: Arc<RowId>, mut reason: Reason, n: u64) {
        if let Some(text) = reason.script_text() {
            // A URL the script wrote into its message shows no password either.
            if let std::borrow::Cow::Owned(redacted) = crate::http::redact(text) {
                *text = redacted;
            }
            shorten(text);
        }
        let mut key = (id, reason);
        // The common case: a reason this row counted in this tick or the one before.
        if let Some(count) = self.failures.get_mut(&key) {
            *count += n;
            return;
        }
        if !self.cap.admit_reason(&key.1) {
            key.1 = key.1.overflow();
        }
        *self.failures.entry(key).or_insert(0) += n;
    }

    /// Counts a `check` by its name: shortened, and past the cap on check names under
    /// [`OVERFLOW_CHECK`].
    pub fn check(&mut self, name: &str, passed: bool) {
        let i = usize::from(!passed);
        let name = match cut_at(name) {
            None => name,
            Some(at) => {
                self.check_key.clear();
                self.check_key.push_str(&name[..at]);
                self.check_key.push('…');
                &self.check_key
            }
        };
        // The common case: a name counted in this tick or the one before.
        if let Some(counts) = self.checks.get_mut(name) {
            counts[i] += 1;
            return;
        }
        let name = name.to_string();
        let key = match self.cap.admit_check(&name) {
            true => name,
            false => OVERFLOW_CHECK.to_string(),
        };
        self.checks.entry(key).or_default()[i] += 1;
    }

    /// Counts a response received for `row`: its HTTP version and its body bytes.
    pub fn response(&mut self, row: usize, h2: bool, bytes: u64) {
        self.protocols[usize::from(h2)] += 1;
        self.rows[row].1.bytes += bytes;
    }

    /// Counts every request still in flight as aborted: called when the run is cut off.
    pub fn abort_inflight(&mut self) {
        for row in 0..self.rows.len() {
            let n = std::mem::take(&mut self.inflight[row]);
            if n > 0 {
                let stats = &mut self.rows[row].1;
                stats.requests += n;
                stats.failures += n;
                self.count_failure(self.rows[row].0.clone(), Reason::Aborted, n);
            }
        }
    }

    /// Takes the counts since the last call, leaving the rows in place and empty. A failure
    /// reason or a check name that counted keeps its entry (at 0) for the next tick, so that
    /// counting it again is one lookup; one that did not is dropped, so entries do not pile up.
    pub fn take(&mut self) -> Snapshot {
        let rows = self
            .rows
            .iter_mut()
            .filter(|(_, s)| s.requests > 0)
            .map(|(id, s)| {
                let fresh = s.fresh_like();
                (id.clone(), std::mem::replace(s, fresh))
            })
            .collect();
        let mut failures = Vec::new();
        self.failures.retain(|(id, reason), n| {
            if *n == 0 {
                return false;
            }
            failures.push((id.clone(), reason.clone(), std::mem::take(n)));
            true
        });
        let mut checks = Vec::new();
        self.checks.retain(|name, counts| {
            if *counts == [0; 2] {
                return false;
            }
            checks.push((name.clone(), std::mem::take(counts)));
            true
        });
        Snapshot {
            rows,
            failures,
            protocols: std::mem::take(&mut self.protocols),
            checks,
            errors: std::mem::take(&mut self.errors),
            dropped: std::mem::take(&mut self.dropped),
            stuck: std::mem::take(&mut self.stuck),
        }
    }

    /// A script call was still running when the run ended and was stopped: `what` says which
    /// (`user N in HOOK at FILE:LINE`).
    pub fn stuck(&mut self, what: String) {
        if self.stuck.len() < STUCK_LISTED {
            self.stuck.push(what);
        }
    }
}

/// The merged view of every worker's snapshots: cumulative rows (in first-seen order), the
/// failure reasons, and the counts of the latest tick for the live "current RPS".
#[derive(Default)]
pub struct Aggregate {
    rows: Vec<(RowId, RowStats)>,
    index: HashMap<RowId, usize>,
    failures: HashMap<(RowId, Reason), u64>,
    /// Requests per row in the current tick (reset by [`Aggregate::end_tick`]).
    tick: HashMap<RowId, u64>,
    last_tick: HashMap<RowId, u64>,
    protocols: [u64; 2],
    /// The current tick's requests, all rows together, and the series of closed ticks.
    tick_stats: RowStats,
    series: Vec<SeriesPoint>,
    /// Checks by name.
    checks: std::collections::BTreeMap<String, [u64; 2]>,
    errors: u64,
    dropped: u64,
    stuck: Vec<String>,
}

impl Aggregate {
    /// Registers rows up front so that the tables list them in the scenario's order.
    pub fn with_rows(rows: &[Arc<RowId>]) -> Self {
        let mut agg = Self::default();
        for row in rows {
            agg.row_mut(row);
        }
        agg
    }

    fn row_mut(&mut self, id: &RowId) -> &mut RowStats {
        let i = match self.index.get(id) {
            Some(&i) => i,
            None => {
                self.rows.push((id.clone(), RowStats::default()));
                self.index.insert(id.clone(), self.rows.len() - 1);
                self.rows.len() - 1
            }
        };
        &mut self.rows[i].1
    }

    pub fn add(&mut self, snap: Snapshot) {
        for (id, stats) in snap.rows {
            self.row_mut(&id).merge(&stats);
            *self.tick.entry((*id).clone()).or_insert(0) += stats.requests;
            self.tick_stats.merge(&stats);
        }
        for (id, reason, n) in snap.failures {
            *self.failures.entry(((*id).clone(), reason)).or_insert(0) += n;
        }
        self.protocols[0] += snap.protocols[0];
        self.protocols[1] += snap.protocols[1];
        self.errors += snap.errors;
        self.dropped += snap.dropped;
        let room = STUCK_LISTED.saturating_sub(self.stuck.len());
        self.stuck.extend(snap.stuck.into_iter().take(room));
        for (name, [passes, fails]) in snap.checks {
            let counts = self.checks.entry(name).or_default();
            counts[0] += passes;
            counts[1] += fails;
        }
    }

    /// Closes the current tick: its counts become the "current" ones, and a point of the time
    /// series (`at`: since the start; `users` running).
    pub fn end_tick(&mut self, at: Duration, users: u64) {
        self.last_tick = std::mem::take(&mut self.tick);
        let stats = std::mem::take(&mut self.tick_stats);
        let h = &stats.latency_us;
        let q = |p: f64| (!h.is_empty()).then(|| h.value_at_quantile(p) as f64 / 1000.0);
        self.series.push(SeriesPoint {
            t_s: round3(at.as_secs_f64()),
            requests: stats.requests,
            failures: stats.failures,
            p50_ms: q(0.5),
            p95_ms: q(0.95),
            p99_ms: q(0.99),
            users,
            bytes: stats.bytes,
            latency_hist: (!h.is_empty()).then(|| encode_histogram(h)),
        });
    }

    /// Requests of `id` in the last closed tick (all rows when `None`).
    pub fn last_tick_requests(&self, id: Option<&RowId>) -> u64 {
        match id {
            Some(id) => self.last_tick.get(id).copied().unwrap_or(0),
            None => self.last_tick.values().sum(),
        }
    }

    /// Requests and failures per second in the last closed tick (the last one may be short).
    pub fn last_tick_rates(&self) -> (f64, f64) {
        let n = self.series.len();
        let Some(last) = self.series.last() else {
            return (0.0, 0.0);
        };
        let before = if n >= 2 { self.series[n - 2].t_s } else { 0.0 };
        let secs = (last.t_s - before).max(1e-3);
        (last.requests as f64 / secs, last.failures as f64 / secs)
    }

    pub fn rows(&self) -> impl Iterator<Item = (&RowId, &RowStats)> {
        self.rows.iter().map(|(id, s)| (id, s))
    }

    /// Passed and failed checks, all names together.
    pub fn check_totals(&self) -> (u64, u64) {
        self.checks
            .values()
            .fold((0, 0), |(p, f), [passes, fails]| (p + passes, f + fails))
    }

    pub fn total(&self) -> RowStats {
        let mut total = RowStats::default();
        for (_, s) in &self.rows {
            total.merge(s);
        }
        total
    }

    /// Failures grouped by (method, name, reason), most frequent first.
    pub fn failures(&self) -> Vec<FailureSummary> {
        let mut out: Vec<FailureSummary> = self
            .failures
            .iter()
            .map(|((id, reason), &count)| FailureSummary {
                method: id.method.clone(),
                name: id.name.clone(),
                reason: reason.to_string(),
                count,
            })
            .collect();
        out.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then_with(|| (&a.name, &a.method, &a.reason).cmp(&(&b.name, &b.method, &b.reason)))
        });
        out
    }

    /// The final, serializable summary. Rows that never saw a request are left out.
    pub fn summary(&self, meta: SummaryMeta) -> Summary {
        self.summary_with(meta, true)
    }

    /// The summary without the encoded histograms (rows' and the series'): what the live
    /// dashboard shows each second, at a fraction of the cost.
    pub fn summary_light(&self, meta: SummaryMeta) -> Summary {
        self.summary_with(meta, false)
    }

    fn summary_with(&self, meta: SummaryMeta, histograms: bool) -> Summary {
        let secs = meta.duration.as_secs_f64();
        let row = |method: &str, name: &str, s: &RowStats| {
            let r = RowSummary::new(method, name, s, secs);
            if histograms { r.with_histograms(s) } else { r }
        };
        let endpoints = self
            .rows
            .iter()
            .filter(|(_, s)| s.requests > 0)
            .map(|(id, s)| row(&id.method, &id.name, s))
            .collect();
        Summary {
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: humantime::format_rfc3339_seconds(meta.started_at).to_string(),
            started_at_ms: meta
                .started_at
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            segment: meta.segment,
            scenario_fingerprint: meta.fingerprint,
            duration_s: round3(secs),
            interrupted: meta.interrupted,
            all_users_started_s: meta.all_users_started.map(|d| round3(d.as_secs_f64())),
            protocols: [("HTTP/1.1", self.protocols[0]), ("HTTP/2", self.protocols[1])]
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(p, n)| (p.to_string(), n))
                .collect(),
            script_errors: self.errors,
            series: match histograms {
                true => self.series.clone(),
                // (Built field by field: cloning a point would copy its encoded histogram,
                // every point's, every second.)
                false => self
                    .series
                    .iter()
                    .map(|p| SeriesPoint {
                        t_s: p.t_s,
                        requests: p.requests,
                        failures: p.failures,
                        p50_ms: p.p50_ms,
                        p95_ms: p.p95_ms,
                        p99_ms: p.p99_ms,
                        users: p.users,
                        bytes: p.bytes,
                        latency_hist: None,
                    })
                    .collect(),
            },
            dropped_iterations: self.dropped,
            thresholds: Vec::new(),
            aborted_by: None,
            stuck: self.stuck.clone(),
            checks: self
                .checks
                .iter()
                .map(|(name, [passes, fails])| CheckSummary {
                    name: name.clone(),
                    passes: *passes,
                    fails: *fails,
                })
                .collect(),
            config: meta.config,
            total: {
                let total = self.total();
                row("", "Aggregated", &total).into_total()
            },
            endpoints,
            failures: self.failures(),
        }
    }
}

/// What the summary needs besides the counts.
pub struct SummaryMeta {
    pub started_at: std::time::SystemTime,
    pub duration: Duration,
    pub interrupted: bool,
    pub all_users_started: Option<Duration>,
    pub config: ConfigSummary,
    pub segment: Option<crate::segment::Segment>,
    pub fingerprint: String,
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The summary file's schema (SPEC: "Summary file"). Field names are stable.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub version: String,
    pub started_at: String,
    pub duration_s: f64,
    pub interrupted: bool,
    /// Seconds from the start until the last user was ready to send (`null` if the run ended
    /// before every user started). With spawn rate R and N users, N/R means it kept up.
    #[serde(default)]
    pub all_users_started_s: Option<f64>,
    /// Responses received per HTTP version.
    #[serde(default)]
    pub protocols: std::collections::BTreeMap<String, u64>,
    /// `check(value, name)` results per name, sorted by name.
    #[serde(default)]
    pub checks: Vec<CheckSummary>,
    /// The thresholds and how they came out (exit 1 if any did not hold).
    #[serde(default)]
    pub thresholds: Vec<crate::threshold::Verdict>,
    /// The threshold (`abort_on_fail`) that stopped the run early, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aborted_by: Option<String>,
    /// Script calls still running when the run ended, stopped by it: `user N in HOOK at
    /// FILE:LINE` (the first few). A worker that never answered is listed too: the counts it
    /// recorded since it last handed them over are missing from this summary.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stuck: Vec<String>,
    /// Script errors outside any request (a failing `scenario`, `on_start`, `on_stop`,
    /// `teardown`): listed in `failures` under `HOOK <name>` rows, not in the request totals.
    #[serde(default)]
    pub script_errors: u64,
    /// Open model: scheduled iterations that found no free user in the pool (not sent).
    #[serde(default)]
    pub dropped_iterations: u64,
    /// Per tick (a second): requests, failures, percentiles, users.
    #[serde(default)]
    pub series: Vec<SeriesPoint>,
    /// The start as unix milliseconds: `report` aligns several files' series by wall-clock
    /// second with it.
    #[serde(default)]
    pub started_at_ms: u64,
    /// `--segment I/N`: this file is one share of a test run on several machines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<crate::segment::Segment>,
    /// The scenario's fingerprint (`report` refuses to merge segments of different ones).
    #[serde(default)]
    pub scenario_fingerprint: String,
    pub config: ConfigSummary,
    pub total: RowSummary,
    pub endpoints: Vec<RowSummary>,
    pub failures: Vec<FailureSummary>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfigSummary {
    pub host: Option<String>,
    pub users: u32,
    pub spawn_rate: f64,
    pub script: String,
    /// The load model in words (`10 users at 10/s`, `stages 30s:100,...`, `50 iterations/s
    /// (open model, ...)`).
    #[serde(default)]
    pub load: String,
    /// The duration asked for (`null`: until interrupted).
    #[serde(default)]
    pub duration_s: Option<f64>,
    /// `--start-at`, as unix milliseconds: the segments of one test share it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RowSummary {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub name: Option<String>,
    pub requests: u64,
    pub failures: u64,
    pub rps: f64,
    /// Response body bytes read for this row.
    #[serde(default)]
    pub bytes_received: u64,
    /// `None` (JSON `null`) when the row has no latency: every request failed before sending
    /// or was aborted. Corrected for coordinated omission (see `RowStats`).
    pub latency_ms: Option<Latency>,
    /// As measured from each request's send, uncorrected.
    #[serde(default)]
    pub service_ms: Option<Latency>,
    /// The whole latency and service histograms (see [`encode_histogram`]): exact merging of
    /// result files, and HdrHistogram's tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_hist: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_hist: Option<String>,
}

impl RowSummary {
    pub fn new(method: &str, name: &str, s: &RowStats, secs: f64) -> Self {
        Self {
            method: Some(method.to_string()),
            name: Some(name.to_string()),
            requests: s.requests,
            failures: s.failures,
            rps: if secs > 0.0 {
                round3(s.requests as f64 / secs)
            } else {
                0.0
            },
            bytes_received: s.bytes,
            latency_ms: Latency::of(&s.latency_us),
            service_ms: Latency::of(&s.service_us),
            latency_hist: None,
            service_hist: None,
        }
    }

    /// With the whole histograms too (for result files; the live view does without).
    pub fn with_histograms(mut self, s: &RowStats) -> Self {
        self.latency_hist = (!s.latency_us.is_empty()).then(|| encode_histogram(&s.latency_us));
        self.service_hist = (!s.service_us.is_empty()).then(|| encode_histogram(&s.service_us));
        self
    }

    fn into_total(mut self) -> Self {
        self.method = None;
        self.name = None;
        self
    }
}

/// Latency figures in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub min: f64,
    pub avg: f64,
    pub max: f64,
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub p99_9: f64,
}

impl Latency {
    /// The figures of a histogram; `None` if it is empty.
    pub fn of(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        let ms = |us: u64| round3(us as f64 / 1000.0);
        Some(Self {
            min: ms(h.min()),
            avg: round3(h.mean() / 1000.0),
            max: ms(h.max()),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p95: ms(h.value_at_quantile(0.95)),
            p99: ms(h.value_at_quantile(0.99)),
            p99_9: ms(h.value_at_quantile(0.999)),
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckSummary {
    pub name: String,
    pub passes: u64,
    pub fails: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FailureSummary {
    pub method: String,
    pub name: String,
    pub reason: String,
    pub count: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(ms: u64) -> Outcome {
        Outcome {
            elapsed: Some(Duration::from_millis(ms)),
            failure: None,
            correction: Correction::None,
        }
    }

    #[test]
    fn recorder_counts_each_outcome_once_and_take_resets() {
        let hello = Arc::new(RowId::new("GET", "/hello"));
        let mut rec = Recorder::new(std::slice::from_ref(&hello));
        let r = rec.row(&hello);
        rec.begin(r);
        rec.finish(r, ok(5));
        rec.begin(r);
        rec.finish(
            r,
            Outcome {
                elapsed: Some(Duration::from_millis(7)),
                failure: Some(Reason::Status(500)),
                correction: Correction::None,
            },
        );
        let dynamic = rec.row_by_name("POST", "/x");
        rec.record(
            dynamic,
            Outcome {
                elapsed: None,
                failure: Some(Reason::Script("boom".into())),
                correction: Correction::None,
            },
        );

        let snap = rec.take();
        assert_eq!(snap.rows.len(), 2);
        assert_eq!(snap.rows[0].1.requests, 2);
        assert_eq!(snap.rows[0].1.failures, 1);
        assert_eq!(snap.rows[0].1.latency_us.len(), 2);
        assert_eq!(snap.rows[1].1.latency_us.len(), 0, "an unsent request has no latency");
        assert_eq!(snap.failures.len(), 2);

        let again = rec.take();
        assert!(
            again.rows.is_empty() && again.failures.is_empty(),
            "take leaves the recorder empty"
        );
    }

    #[test]
    fn abort_inflight_counts_unfinished_requests_as_failures() {
        let row = Arc::new(RowId::new("GET", "/slow"));
        let mut rec = Recorder::new(&[row]);
        rec.begin(0);
        rec.begin(0);
        rec.finish(0, ok(1));
        rec.abort_inflight();
        let snap = rec.take();
        assert_eq!(snap.rows[0].1.requests, 2);
        assert_eq!(snap.rows[0].1.failures, 1);
        assert_eq!(snap.failures, vec![(snap.rows[0].0.clone(), Reason::Aborted, 1)]);
    }

    #[test]
    fn aggregate_merges_snapshots_and_keeps_row_order() {
        let a = Arc::new(RowId::new("GET", "/b"));
        let b = Arc::new(RowId::new("POST", "/a"));
        let mut agg = Aggregate::with_rows(&[a.clone(), b.clone()]);
        for _ in 0..2 {
            let mut rec = Recorder::new(&[a.clone(), b.clone()]);
            for ms in 1..=100 {
                rec.record(0, ok(ms));
            }
            rec.record(
                1,
                Outcome {
                    elapsed: Some(Duration::from_millis(1)),
                    failure: Some(Reason::Status(404)),
                    correction: Correction::None,
                },
            );
            agg.add(rec.take());
        }
        agg.end_tick(Duration::from_secs(1), 1);
        assert_eq!(agg.last_tick_requests(None), 202);
        let names: Vec<_> = agg.rows().map(|(id, _)| id.name.clone()).collect();
        assert_eq!(names, ["/b", "/a"]);
        let total = agg.total();
        assert_eq!((total.requests, total.failures), (202, 2));
        let fails = agg.failures();
        assert_eq!(
            fails,
            vec![FailureSummary {
                method: "POST".into(),
                name: "/a".into(),
                reason: "HTTP 404".into(),
                count: 2
            }]
        );
        let lat = Latency::of(&agg.rows().next().unwrap().1.latency_us).unwrap();
        assert!((lat.p50 - 50.0).abs() < 0.1, "p50 {}", lat.p50);
        assert!((lat.max - 100.0).abs() < 0.1, "max {}", lat.max);
    }
    fn failed(reason: Reason) -> Outcome {
        Outcome {
            elapsed: Some(Duration::from_millis(1)),
            failure: Some(reason),
            correction: Correction::None,
        }
    }

    /// The summary of what `recorders` took, merged as the runner merges them.
    fn merged(recorders: &mut [&mut Recorder]) -> Summary {
        let mut agg = Aggregate::default();
        for rec in recorders.iter_mut() {
            agg.add(rec.take());
        }
        agg.end_tick(Duration::from_secs(1), 1);
        agg.summary(SummaryMeta {
            started_at: std::time::SystemTime::now(),
            duration: Duration::from_secs(1),
            interrupted: false,
            all_users_started: None,
            config: ConfigSummary {
                host: None,
                users: 1,
                spawn_rate: 1.0,
                script: "t.lua".into(),
                load: String::new(),
                duration_s: None,
                start_at_ms: None,
            },
            segment: None,
            fingerprint: String::new(),
        })
    }

    /// Failures of the summary's row `name`, as (reason, count), sorted by reason.
    fn reasons_of(s: &Summary, name: &str) -> Vec<(String, u64)> {
        let mut out: Vec<_> = s
            .failures
            .iter()
            .filter(|f| f.name == name)
            .map(|f| (f.reason.clone(), f.count))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn a_password_in_a_scripts_message_is_not_shown() {
        let a = Arc::new(RowId::new("GET", "/a"));
        let mut rec = Recorder::with_cap(std::slice::from_ref(&a), NameCap::new(10));
        rec.record(
            0,
            failed(Reason::Script(
                "scenario: s.lua:3: oops for http://frank:pw1@x/y".into(),
            )),
        );
        rec.error(&a, Reason::Rejected("no luck with https://ann:pw2@h:8/".into()));
        let snap = rec.take();
        let text: Vec<String> = snap.failures.iter().map(|(_, r, _)| r.to_string()).collect();
        assert_eq!(text.len(), 2, "{text:?}");
        assert!(
            text.iter().all(|t| !t.contains("pw1") && !t.contains("pw2")),
            "{text:?}"
        );
        assert!(text.iter().any(|t| t.contains("http://frank:***@x/y")), "{text:?}");
    }

    #[test]
    fn past_the_cap_new_reasons_count_under_one_overflow_reason_per_row_and_counts_stay_exact() {
        let a = Arc::new(RowId::new("GET", "/a"));
        let b = Arc::new(RowId::new("GET", "/b"));
        let mut rec = Recorder::with_cap(&[a.clone(), b.clone()], NameCap::new(3));
        // Row /a: five script errors twice each; the first three reasons have room.
        for _ in 0..2 {
            for i in 0..5 {
                rec.record(0, failed(Reason::Script(format!("before_request: boom {i}"))));
            }
        }
        // Row /b: a reason already admitted keeps its own row, new ones overflow (keeping their
        // class), and reasons without text from the script are not capped.
        rec.record(1, failed(Reason::Script("before_request: boom 0".into())));
        for i in 0..4 {
            rec.record(1, failed(Reason::Rejected(format!("bad {i}"))));
            rec.record(1, failed(Reason::ScriptLimit(format!("after_response: limit {i}"))));
        }
        rec.record(1, failed(Reason::Status(500)));
        rec.record(1, failed(Reason::Refused));
        // Errors outside requests go through the same cap.
        let hook = Arc::new(RowId::new("HOOK", "scenario"));
        for i in 0..3 {
            rec.error(&hook, Reason::Script(format!("scenario: oops {i}")));
        }

        let s = merged(&mut [&mut rec]);
        assert_eq!(
            reasons_of(&s, "/a"),
            [
                ("script error: (reasons past --max-names)".to_string(), 4),
                ("script error: before_request: boom 0".to_string(), 2),
                ("script error: before_request: boom 1".to_string(), 2),
                ("script error: before_request: boom 2".to_string(), 2),
            ]
        );
        assert_eq!(
            reasons_of(&s, "/b"),
            [
                ("(reasons past --max-names)".to_string(), 4),
                ("HTTP 500".to_string(), 1),
                ("connection refused".to_string(), 1),
                ("script error: before_request: boom 0".to_string(), 1),
                ("script limit: (reasons past --max-names)".to_string(), 4),
            ]
        );
        assert_eq!(
            reasons_of(&s, "scenario"),
            [("script error: (reasons past --max-names)".to_string(), 3)]
        );
        for row in &s.endpoints {
            let sum: u64 = reasons_of(&s, row.name.as_deref().unwrap()).iter().map(|r| r.1).sum();
            assert_eq!(sum, row.failures, "{row:?}");
        }
        assert_eq!((s.total.requests, s.total.failures), (21, 21));
        assert_eq!(s.script_errors, 3);
    }

    #[test]
    fn long_reasons_and_check_names_are_cut_on_a_character_boundary_and_share_a_row() {
        let a = Arc::new(RowId::new("GET", "/a"));
        let mut rec = Recorder::with_cap(std::slice::from_ref(&a), NameCap::new(10));
        // Two-byte characters: a cut at a byte count would split one.
        let long = "é".repeat(250);
        rec.record(0, failed(Reason::Script(format!("after_response: {long} 1"))));
        rec.record(0, failed(Reason::Script(format!("after_response: {long} 2"))));
        rec.record(0, failed(Reason::Rejected(format!("{long}x"))));
        let short = "é".repeat(200);
        rec.record(0, failed(Reason::Rejected(short.clone())));
        rec.check(&format!("{long} a"), true);
        rec.check(&format!("{long} b"), false);
        rec.check(&short, true);

        let s = merged(&mut [&mut rec]);
        let cut = |text: &str| format!("{}…", text.chars().take(200).collect::<String>());
        let mut want = vec![
            (format!("script error: {}", cut(&format!("after_response: {long}"))), 2),
            (cut(&long), 1),
            (short.clone(), 1),
        ];
        want.sort();
        assert_eq!(reasons_of(&s, "/a"), want);
        let mut checks: Vec<_> = s.checks.iter().map(|c| (c.name.clone(), c.passes, c.fails)).collect();
        checks.sort();
        let mut want = vec![(cut(&long), 1, 1), (short, 1, 0)];
        want.sort();
        assert_eq!(checks, want);
    }

    #[test]
    fn past_the_cap_new_check_names_count_under_one_overflow_check() {
        let mut rec = Recorder::with_cap(&[], NameCap::new(3));
        let mut calls = 0;
        for round in 0..3 {
            for i in 0..6 {
                rec.check(&format!("check {i}"), (i + round) % 2 == 0);
                calls += 1;
            }
        }
        let s = merged(&mut [&mut rec]);
        let checks: Vec<_> = s.checks.iter().map(|c| (c.name.as_str(), c.passes, c.fails)).collect();
        assert_eq!(
            checks,
            [
                ("(checks past --max-names)", 4, 5),
                ("check 0", 2, 1),
                ("check 1", 1, 2),
                ("check 2", 2, 1),
            ]
        );
        let counted: u64 = s.checks.iter().map(|c| c.passes + c.fails).sum();
        assert_eq!(counted, calls);
    }

    #[test]
    fn workers_sharing_one_cap_admit_at_most_its_size_of_reasons_and_checks_together() {
        let a = Arc::new(RowId::new("GET", "/a"));
        let cap = NameCap::new(2);
        let mut one = Recorder::with_cap(std::slice::from_ref(&a), cap.clone());
        let mut two = Recorder::with_cap(std::slice::from_ref(&a), cap);
        one.record(0, failed(Reason::Rejected("r0".into())));
        two.record(0, failed(Reason::Rejected("r1".into())));
        // Full: a third reason overflows in either worker; one the other worker admitted does not.
        one.record(0, failed(Reason::Rejected("r2".into())));
        two.record(0, failed(Reason::Rejected("r0".into())));
        one.record(0, failed(Reason::Rejected("r1".into())));
        one.check("c0", true);
        two.check("c1", true);
        two.check("c2", false);
        one.check("c1", false);
        one.check("c3", true);

        // Over several ticks: what a worker admitted stays admitted after a take.
        let first = merged(&mut [&mut one, &mut two]);
        two.record(0, failed(Reason::Rejected("r3".into())));
        two.record(0, failed(Reason::Rejected("r1".into())));
        let second = merged(&mut [&mut one, &mut two]);

        assert_eq!(
            reasons_of(&first, "/a"),
            [
                ("(reasons past --max-names)".to_string(), 1),
                ("r0".to_string(), 2),
                ("r1".to_string(), 2),
            ]
        );
        assert_eq!(
            reasons_of(&second, "/a"),
            [("(reasons past --max-names)".to_string(), 1), ("r1".to_string(), 1)]
        );
        let checks: Vec<_> = first
            .checks
            .iter()
            .map(|c| (c.name.as_str(), c.passes, c.fails))
            .collect();
        assert_eq!(
            checks,
            [("(checks past --max-names)", 1, 1), ("c0", 1, 0), ("c1", 1, 1)]
        );
    }

    /// V2 bytes deflated and framed as the interchange encoding wants, in base64.
    fn deflated(plain: &[u8]) -> String {
        use base64::Engine as _;
        use std::io::Write as _;
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(plain).unwrap();
        let z = z.finish().unwrap();
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&0x1c84_9314u32.to_be_bytes());
        bytes.extend_from_slice(&(z.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&z);
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    /// A V2 header (counts' length, digits 3, lowest 1, highest 2, ratio 1) and `counts`.
    fn v2(claimed: u32, counts: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        for word in [0x1c84_9313u32, claimed, 0, 3] {
            b.extend_from_slice(&word.to_be_bytes());
        }
        b.extend_from_slice(&1u64.to_be_bytes());
        b.extend_from_slice(&2u64.to_be_bytes());
        b.extend_from_slice(&1.0f64.to_be_bytes());
        b.extend_from_slice(counts);
        b
    }

    #[test]
    fn a_histogram_claiming_more_counts_than_it_holds_is_refused_before_decoding() {
        // 56 characters of base64 that claim 2 GiB of counts: refused without the room.
        let bomb = deflated(&v2(0x8000_0000, &[2]));
        assert!(bomb.len() <= 56, "{bomb}");
        assert_eq!(
            decode_histogram(&bomb).unwrap_err(),
            "a histogram's header claims 2147483648 bytes of counts, and it holds 1"
        );
        assert!(
            decode_histogram(&deflated(&v2(2, &[2])))
                .unwrap_err()
                .contains("claims 2 bytes")
        );
        // What inflates past the cap is not inflated further.
        let huge = deflated(&v2(0, &vec![0; HISTOGRAM_MAX]));
        assert_eq!(
            decode_histogram(&huge).unwrap_err(),
            "a histogram is larger than 16 MiB once inflated"
        );
        // One honest about its length decodes (a count of 1, zig-zag encoded, at value 0), and
        // what stormlight writes reads back.
        let h = decode_histogram(&deflated(&v2(1, &[2]))).unwrap();
        assert_eq!((h.len(), h.max()), (1, 0));
        let mut written = new_histogram();
        for v in [1, 250, 3_000_000, u64::MAX / 4] {
            written.record(v).unwrap();
        }
        let read = decode_histogram(&encode_histogram(&written)).unwrap();
        assert_eq!((read.len(), read.max()), (4, written.max()));
        assert!(decode_histogram("aGVsbG8=").unwrap_err().contains("V2"));
    }
}
