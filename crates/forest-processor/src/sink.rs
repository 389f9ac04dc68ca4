//! The second half of a batch: the store write, then delivering its outputs. By default it
//! runs on a committer thread beside each worker, so the worker polls and folds the next batch
//! while this one is written and delivered (one worker thread doing both left records waiting
//! in librdkafka's queue for the whole write and delivery: most of the p99 latency at half
//! the maximum rate). In transactions mode, and with `overlap_commits` off, it runs inline.
//!
//! Order and safety: the committer takes batches one at a time, in order, so batch N's outputs
//! are acknowledged before batch N+1 is written, exactly as inline. What the worker folds
//! meanwhile lives in its cache; the cache keeps every user of a batch not yet durable (see
//! `ProjectionCache::prepare`), so a fold never reloads an older state from the store. A
//! failed write or delivery stops the committer and then the worker; a restart replays from
//! the stored offsets, as after any crash. Before partitions are revoked and on shutdown, the
//! worker waits until everything handed over is durable and acknowledged.

use crate::core::{Tally, lock};
use crate::metrics as m;
use crate::{CrashPoint, ProcessorError, ProcessorStats};
use forest_kafka::OutboxProducer;
use forest_store::{OutboxEntry, PreparedBatch, Store};
use rustc_hash::FxHashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::time::{Duration, Instant};

/// What a batch's bookkeeping needs once it is durable.
pub(crate) struct Meta {
    /// The cache's ticket for the batch's states.
    pub ticket: u64,
    /// Next offsets by (topic index, partition), for the worker's Kafka commits...
    pub offsets: Vec<((u8, i32), i64)>,
    /// ...and by topic name, for the stats.
    pub shown: Vec<(String, i32, i64)>,
    pub tally: Tally,
    pub records: usize,
    /// Key writes, counted by the worker (not from the store's totals, which other workers
    /// add to).
    pub writes: u64,
    /// When the batch was closed.
    pub closed: Instant,
    /// Record timestamps, for the latency histograms.
    pub batch_ts: Vec<i64>,
    /// Projections the batch writes.
    pub written: u64,
    /// False for a batch of the spaced at-least-once baseline that wrote no projections: its
    /// offsets wait for the next full write before they go to Kafka.
    pub full: bool,
}

/// A batch closed by the worker: serialised, not yet written.
pub(crate) struct Batch {
    pub prepared: PreparedBatch,
    /// The outputs, in the order of the outbox sequence numbers `prepared` reserved.
    pub entries: Vec<OutboxEntry>,
    /// Index in `entries` of each changelog checkpoint, with its input partition.
    pub checkpoints: Vec<(usize, i32)>,
    pub meta: Meta,
}

/// Writes batches and delivers their outputs.
pub(crate) struct Sink {
    pub store: Arc<Store>,
    pub producer: OutboxProducer,
    pub stats: Arc<ProcessorStats>,
    pub crash_at: Option<CrashPoint>,
    pub store_write_delay_ms: Arc<AtomicU64>,
    pub batches_in_run: u64,
    pub max_in_flight: usize,
    pub at_least_once: bool,
    /// The changelog topic, when projections also go there.
    pub changelog: Option<String>,
    /// Outbox sequence -> input partition, for changelog checkpoints in flight: once Kafka
    /// acknowledged one, the store records the changelog end it implies.
    checkpoint_seqs: FxHashMap<u64, i32>,
}

impl Sink {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<Store>,
        producer: OutboxProducer,
        stats: Arc<ProcessorStats>,
        crash_at: Option<CrashPoint>,
        store_write_delay_ms: Arc<AtomicU64>,
        max_in_flight: usize,
        at_least_once: bool,
        changelog: Option<String>,
    ) -> Self {
        Self {
            store,
            producer,
            stats,
            crash_at,
            store_write_delay_ms,
            batches_in_run: 0,
            max_in_flight,
            at_least_once,
            changelog,
            checkpoint_seqs: FxHashMap::default(),
        }
    }

    /// Writes the batch, then delivers its outputs (waiting for acknowledgements, up to
    /// `max_in_flight` left over). Returns its bookkeeping for the worker.
    pub fn complete(&mut self, batch: Batch) -> Result<Meta, ProcessorError> {
        let Batch {
            prepared,
            entries,
            checkpoints,
            mut meta,
        } = batch;
        let delay = self.store_write_delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        let seqs = self.store.write_prepared(prepared)?;
        self.durable(&mut meta);
        self.batches_in_run += 1;
        let entries: Vec<(u64, OutboxEntry)> = if self.at_least_once {
            (0..).zip(entries).collect()
        } else {
            seqs.zip(entries).collect()
        };
        for &(i, p) in &checkpoints {
            self.checkpoint_seqs.insert(entries[i].0, p);
        }
        if self.crash_at == Some(CrashPoint::AfterStoreWrite(self.batches_in_run)) {
            return Err(ProcessorError::InjectedCrash(CrashPoint::AfterStoreWrite(
                self.batches_in_run,
            )));
        }
        let durable = Instant::now();
        self.deliver(entries)?;
        self.stats
            .stage_deliver
            .record_ms(durable.elapsed().as_millis() as u64);
        self.finish(&mut meta);
        Ok(meta)
    }

    /// Bookkeeping once a batch's store write succeeded: metrics, the offsets shown, the
    /// produce-to-projection latency.
    pub fn durable(&self, meta: &mut Meta) {
        let now = Instant::now();
        self.stats
            .stage_store
            .record_ms(now.duration_since(meta.closed).as_millis() as u64);
        self.stats
            .store_writes
            .fetch_add(meta.writes, Ordering::Relaxed);
        metrics::counter!(m::STORE_WRITES).increment(meta.writes);
        self.stats
            .projections_written
            .fetch_add(meta.written, Ordering::Relaxed);
        metrics::counter!(m::PROJECTIONS_WRITTEN).increment(meta.written);
        meta.tally.emit();
        {
            let mut shown = lock(&self.stats.committed_offsets);
            for (t, p, o) in meta.shown.drain(..) {
                shown.insert((t, p), o);
            }
        }
        self.stats
            .committed_records
            .fetch_add(meta.records as u64, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        metrics::histogram!(m::BATCH_SIZE).record(meta.records as f64);
        let now_ms = now_ms();
        self.stats.latency_durable.record_all_ms(
            meta.batch_ts
                .iter()
                .map(|&ts| now_ms.saturating_sub(ts).max(0) as u64),
        );
        self.show_outbox_depth();
    }

    /// Bookkeeping once a batch is durable and its outputs delivered: batch metrics and the
    /// produce-to-output latency of its records.
    pub fn finish(&self, meta: &mut Meta) {
        metrics::histogram!(m::BATCH_DURATION).record(meta.closed.elapsed().as_secs_f64());
        let now_ms = now_ms();
        let oldest = meta.batch_ts.iter().copied().fold(now_ms, i64::min);
        self.stats.latency.record_all_ms(
            meta.batch_ts
                .drain(..)
                .map(|ts| now_ms.saturating_sub(ts).max(0) as u64),
        );
        metrics::histogram!(m::EVENT_LATENCY).record((now_ms - oldest).max(0) as f64 / 1000.0);
    }

    /// Sets the outbox-depth gauge from the store's running count of outbox entries (every
    /// worker's, since they share the store): what is durably waiting for Kafka, including
    /// entries a previous run left.
    pub fn show_outbox_depth(&self) {
        metrics::gauge!(m::OUTBOX_DEPTH).set(self.store.outbox_depth() as f64);
    }

    /// Sends the batch's outputs, then waits until at most `max_in_flight` are
    /// unacknowledged (the backpressure on a slow output topic). Acknowledged entries leave
    /// the outbox.
    fn deliver(&mut self, entries: Vec<(u64, OutboxEntry)>) -> Result<(), ProcessorError> {
        self.producer.send(&entries)?;
        self.settle(self.max_in_flight)
    }

    /// Waits until every output sent is acknowledged: before partitions are revoked and on
    /// shutdown.
    pub fn flush_outputs(&mut self) -> Result<(), ProcessorError> {
        self.settle(0)
    }

    fn settle(&mut self, max_in_flight: usize) -> Result<(), ProcessorError> {
        let store = (!self.at_least_once).then_some(&*self.store);
        let n = self.producer.settle(store, max_in_flight)?;
        self.stats
            .outputs_delivered
            .fetch_add(n as u64, Ordering::Relaxed);
        if store.is_some() && n > 0 {
            // Each acknowledged output's outbox entry was deleted: a key write too.
            self.stats
                .store_writes
                .fetch_add(n as u64, Ordering::Relaxed);
            metrics::counter!(m::STORE_WRITES).increment(n as u64);
        }
        self.show_outbox_depth();
        self.record_changelog_ends()
    }

    /// Outbox mode with the changelog: records in the store the changelog end each
    /// acknowledged checkpoint implies (its offset + 1), so a later assignment can tell whether
    /// another instance wrote the partition's changelog since.
    fn record_changelog_ends(&mut self) -> Result<(), ProcessorError> {
        let Some(changelog) = &self.changelog else {
            return Ok(());
        };
        let mut ends: FxHashMap<i32, i64> = FxHashMap::default();
        for (seq, offset) in self.producer.take_acked_offsets() {
            if let Some(p) = self.checkpoint_seqs.remove(&seq) {
                let e = ends.entry(p).or_insert(0);
                *e = (*e).max(offset + 1);
            }
        }
        if !ends.is_empty() {
            self.store.commit(
                std::iter::empty(),
                ends.iter().map(|(&p, &e)| (changelog.as_str(), p, e)),
                &[],
            )?;
        }
        Ok(())
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

enum Job {
    Batch(Box<Batch>),
    /// Wait until every output sent is acknowledged.
    Flush,
}

enum Done {
    Batch(Box<Meta>),
    Flushed,
}

/// The worker's handle on its committer thread.
pub(crate) struct Committer {
    jobs: Option<SyncSender<Job>>,
    done: Receiver<Result<Done, ProcessorError>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Jobs handed over and not yet reported back.
    in_flight: usize,
}

impl Committer {
    /// Starts the thread. At most one job waits while another runs, so at most two closed
    /// batches are held beyond the store (and the worker blocks handing over a third).
    pub fn spawn(mut sink: Sink) -> Result<Self, ProcessorError> {
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Job>(1);
        let (tx, done) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("forest-commit".into())
            .spawn(move || {
                for job in rx {
                    let r = match job {
                        Job::Batch(b) => sink.complete(*b).map(|m| Done::Batch(Box::new(m))),
                        Job::Flush => sink.flush_outputs().map(|()| Done::Flushed),
                    };
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        // After a failure nothing more is written: the worker stops, and a
                        // restart replays from what is durable.
                        break;
                    }
                }
            })
            .map_err(|_| ProcessorError::Committer("could not start"))?;
        Ok(Self {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            in_flight: 0,
        })
    }

    /// Whether anything handed over is not yet reported back.
    pub fn busy(&self) -> bool {
        self.in_flight > 0
    }

    pub fn submit(&mut self, batch: Batch) -> Result<(), ProcessorError> {
        self.send(Job::Batch(Box::new(batch)))
    }

    fn send(&mut self, job: Job) -> Result<(), ProcessorError> {
        let sent = self.jobs.as_ref().is_some_and(|j| j.send(job).is_ok());
        if !sent {
            // The thread stopped after a failure: report that failure.
            return Err(self.failure());
        }
        self.in_flight += 1;
        Ok(())
    }

    /// The error the thread stopped on (it stops only after one).
    fn failure(&mut self) -> ProcessorError {
        loop {
            match self.done.recv() {
                Ok(Err(e)) => return e,
                Ok(Ok(_)) => {}
                Err(_) => return ProcessorError::Committer("stopped"),
            }
        }
    }

    /// Collects what the thread reported: each durable batch's bookkeeping, passed to
    /// `durable` in order. With `wait`, first asks for every output to be acknowledged and
    /// waits until everything handed over is done.
    pub fn collect(
        &mut self,
        wait: bool,
        mut durable: impl FnMut(Meta),
    ) -> Result<(), ProcessorError> {
        if wait {
            self.send(Job::Flush)?;
        }
        while self.in_flight > 0 {
            let got = if wait {
                self.done.recv().map_err(|_| TryRecvError::Disconnected)
            } else {
                self.done.try_recv()
            };
            match got {
                Ok(Ok(Done::Batch(meta))) => {
                    self.in_flight -= 1;
                    durable(*meta);
                }
                Ok(Ok(Done::Flushed)) => self.in_flight -= 1,
                Ok(Err(e)) => {
                    self.in_flight = 0;
                    return Err(e);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.in_flight = 0;
                    return Err(ProcessorError::Committer("stopped"));
                }
            }
        }
        Ok(())
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it finished the job in hand.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
