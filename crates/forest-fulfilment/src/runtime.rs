//! The fulfilment's consumer loop: read trees and reports, fold them through the [`Ledger`],
//! write state + offsets + outputs in one RocksDB batch, deliver the outputs.

use crate::ledger::{
    self, ConfirmationOutcome, Effect, Ledger, OrderBook, OrderRecord, TreeOutcome, keys,
};
use crate::metrics as m;
use crate::partners::PartnersSource;
use crate::{CrashPoint, FulfilmentConfig, FulfilmentError, FulfilmentStats, Shutdown};
use forest_kafka::{ClientConfigExt, OutboxProducer, client_config, headers};
use forest_proto::v1::{PlantingConfirmed, TreeMatured};
use forest_store::{OutboxEntry, Store};
use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const TREES: usize = 0;
const CONFIRMATIONS: usize = 1;

/// Orders as the ledger sees them: this batch's unwritten records over the store.
struct Book<'a> {
    store: &'a Store,
    overlay: &'a mut HashMap<String, OrderRecord>,
}

impl OrderBook for Book<'_> {
    type Error = FulfilmentError;

    fn get(&mut self, order_id: &str) -> Result<Option<OrderRecord>, FulfilmentError> {
        if let Some(r) = self.overlay.get(order_id) {
            return Ok(Some(r.clone()));
        }
        let key = keys::order(order_id);
        match self.store.get_kv(&key)? {
            None => Ok(None),
            Some(bytes) => Ok(Some(ledger::decode(&key, &bytes)?)),
        }
    }

    fn put(&mut self, record: OrderRecord) {
        self.overlay.insert(record.order_id.clone(), record);
    }
}

struct Service {
    cfg: FulfilmentConfig,
    /// Input topic names by index (TREES, CONFIRMATIONS).
    inputs: [String; 2],
    store: Store,
    producer: OutboxProducer,
    ledger: Ledger,
    overlay: HashMap<String, OrderRecord>,
    pending: Vec<OutboxEntry>,
    effects: Vec<Effect>,
    offsets: BTreeMap<(usize, i32), i64>,
    committed: BTreeMap<(usize, i32), i64>,
    batch_records: usize,
    batch_started: Option<Instant>,
    stats: Arc<FulfilmentStats>,
    applied_in_run: u64,
    batches_in_run: u64,
    partners_text: String,
    reload_failing: bool,
}

impl Service {
    fn process(
        &mut self,
        input: usize,
        partition: i32,
        offset: i64,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), FulfilmentError> {
        if self.batch_started.is_none() {
            self.batch_started = Some(Instant::now());
        }
        let mut effects = std::mem::take(&mut self.effects);
        let dead = if input == TREES {
            self.on_tree(key, value, &mut effects)?
        } else {
            self.on_confirmation(value, &mut effects)?
        };
        if let Some((reason, error)) = dead {
            self.dead_letter(input, partition, offset, key, value, reason, error);
        }
        self.emit(&mut effects);
        self.effects = effects;
        self.offsets.insert((input, partition), offset + 1);
        self.batch_records += 1;
        self.applied_in_run += 1;
        if self.cfg.crash_at == Some(CrashPoint::AfterApplied(self.applied_in_run)) {
            return Err(FulfilmentError::InjectedCrash(CrashPoint::AfterApplied(
                self.applied_in_run,
            )));
        }
        Ok(())
    }

    /// Returns a dead-letter reason and text for a record that must go to the DLQ.
    fn on_tree(
        &mut self,
        key: &[u8],
        value: &[u8],
        effects: &mut Vec<Effect>,
    ) -> Result<Option<(&'static str, String)>, FulfilmentError> {
        self.stats.trees.fetch_add(1, Ordering::Relaxed);
        let tree = match TreeMatured::decode(value) {
            Ok(t) => t,
            Err(e) => {
                metrics::counter!(m::TREES, "result" => "invalid").increment(1);
                return Ok(Some((
                    "undecodable",
                    format!("not a TreeMatured protobuf: {e}"),
                )));
            }
        };
        if key != tree.user_id.as_bytes() {
            metrics::counter!(m::TREES, "result" => "invalid").increment(1);
            return Ok(Some((
                "invalid_tree",
                format!(
                    "record key {:?} is not the tree's user_id {:?}",
                    String::from_utf8_lossy(key),
                    tree.user_id
                ),
            )));
        }
        let outcome = self.ledger.on_tree(
            &mut Book {
                store: &self.store,
                overlay: &mut self.overlay,
            },
            &tree,
            effects,
        );
        Ok(match outcome? {
            TreeOutcome::Ordered => {
                metrics::counter!(m::TREES, "result" => "ordered").increment(1);
                None
            }
            TreeOutcome::Backlogged(reason) => {
                metrics::counter!(m::TREES, "result" => "backlogged").increment(1);
                metrics::counter!(m::BACKLOGGED, "reason" => reason.code()).increment(1);
                tracing::debug!(tree = %tree.tree_id, reason = reason.code(), "tree backlogged");
                None
            }
            TreeOutcome::Duplicate => {
                metrics::counter!(m::TREES, "result" => "duplicate").increment(1);
                self.stats.duplicate_trees.fetch_add(1, Ordering::Relaxed);
                None
            }
            TreeOutcome::Invalid(e) => {
                metrics::counter!(m::TREES, "result" => "invalid").increment(1);
                Some(("invalid_tree", e))
            }
        })
    }

    fn on_confirmation(
        &mut self,
        value: &[u8],
        effects: &mut Vec<Effect>,
    ) -> Result<Option<(&'static str, String)>, FulfilmentError> {
        self.stats.confirmations.fetch_add(1, Ordering::Relaxed);
        let report = match PlantingConfirmed::decode(value) {
            Ok(c) => c,
            Err(e) => {
                metrics::counter!(m::CONFIRMATIONS, "result" => "undecodable").increment(1);
                return Ok(Some((
                    "undecodable",
                    format!("not a PlantingConfirmed protobuf: {e}"),
                )));
            }
        };
        let outcome = self.ledger.on_confirmation(
            &mut Book {
                store: &self.store,
                overlay: &mut self.overlay,
            },
            &report,
            effects,
        );
        let outcome = outcome?;
        metrics::counter!(m::CONFIRMATIONS, "result" => outcome.code()).increment(1);
        let s = &self.stats;
        Ok(match outcome {
            ConfirmationOutcome::Planted => None,
            ConfirmationOutcome::Reallocated => {
                s.reallocations.fetch_add(1, Ordering::Relaxed);
                None
            }
            ConfirmationOutcome::Backlogged(reason) => {
                metrics::counter!(m::BACKLOGGED, "reason" => reason.code()).increment(1);
                None
            }
            ConfirmationOutcome::Duplicate => {
                s.duplicate_confirmations.fetch_add(1, Ordering::Relaxed);
                None
            }
            ConfirmationOutcome::Unknown => {
                s.unknown_confirmations.fetch_add(1, Ordering::Relaxed);
                Some((
                    "unknown_order",
                    format!("no order {:?} exists", report.order_id),
                ))
            }
            ConfirmationOutcome::Stale(e) => {
                s.stale_confirmations.fetch_add(1, Ordering::Relaxed);
                Some(("stale_confirmation", e))
            }
            ConfirmationOutcome::Invalid(e) => Some(("invalid_confirmation", e)),
        })
    }

    /// Turns the ledger's effects into outbox entries for this batch.
    fn emit(&mut self, effects: &mut Vec<Effect>) {
        let t = &self.cfg.topics;
        for e in effects.drain(..) {
            match e {
                Effect::Order(o) => {
                    self.stats.orders.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(m::ORDERS, "partner" => o.partner_id.clone()).increment(1);
                    if o.attempt > 1 {
                        tracing::debug!(order = %o.order_id, attempt = o.attempt, site = %o.site_id, "re-allocated");
                    }
                    self.pending.push(OutboxEntry {
                        partition: None,
                        topic: t.orders.clone(),
                        key: o.partner_id.as_bytes().to_vec(),
                        value: o.encode_to_vec(),
                        headers: vec![],
                    });
                }
                Effect::Certificate(c) => {
                    self.stats.certificates.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(m::CERTIFICATES).increment(1);
                    self.pending.push(OutboxEntry {
                        partition: None,
                        topic: t.certificates.clone(),
                        key: c.user_id.as_bytes().to_vec(),
                        value: c.encode_to_vec(),
                        headers: vec![],
                    });
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn dead_letter(
        &mut self,
        input: usize,
        partition: i32,
        offset: i64,
        key: &[u8],
        value: &[u8],
        reason: &'static str,
        error: String,
    ) {
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::DLQ_RECORDS, "reason" => reason).increment(1);
        self.pending.push(OutboxEntry {
            partition: None,
            topic: self.cfg.topics.dlq.clone(),
            key: key.to_vec(),
            value: value.to_vec(),
            headers: vec![
                (headers::REASON.into(), reason.as_bytes().to_vec()),
                (headers::ERROR.into(), error.into_bytes()),
                (
                    headers::SOURCE_TOPIC.into(),
                    self.inputs[input].as_bytes().to_vec(),
                ),
                (
                    headers::SOURCE_PARTITION.into(),
                    partition.to_string().into_bytes(),
                ),
                (
                    headers::SOURCE_OFFSET.into(),
                    offset.to_string().into_bytes(),
                ),
            ],
        });
    }

    /// Writes orders, ledger changes, offsets and outputs in one batch, then delivers the
    /// outputs. Returns whether anything was written.
    fn commit(&mut self) -> Result<bool, FulfilmentError> {
        let changes = self.ledger.take_changes();
        if self.offsets.is_empty()
            && self.pending.is_empty()
            && self.overlay.is_empty()
            && changes.is_empty()
        {
            return Ok(false);
        }
        let started = Instant::now();
        let mut kv: Vec<(Vec<u8>, Option<Vec<u8>>)> = self
            .overlay
            .drain()
            .map(|(id, rec)| (keys::order(&id), Some(ledger::encode(&rec))))
            .collect();
        kv.extend(changes);
        let inputs = &self.inputs;
        let offsets: Vec<(&str, i32, i64)> = self
            .offsets
            .iter()
            .map(|(&(t, p), &o)| (inputs[t].as_str(), p, o))
            .collect();
        let seqs = self.store.commit_kv(
            kv.iter().map(|(k, v)| (k.as_slice(), v.as_deref())),
            offsets,
            &self.pending,
        )?;
        {
            let mut shown = self
                .stats
                .committed_offsets
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for (&(t, p), &o) in &self.offsets {
                shown.insert((self.inputs[t].clone(), p), o);
            }
        }
        self.committed.append(&mut self.offsets);
        self.batch_records = 0;
        self.batch_started = None;
        self.batches_in_run += 1;
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        let backlog = self.ledger.backlog_len();
        self.stats.backlog.store(backlog as u64, Ordering::Relaxed);
        metrics::gauge!(m::BACKLOG).set(backlog as f64);
        let entries: Vec<(u64, OutboxEntry)> = seqs.zip(self.pending.drain(..)).collect();
        if self.cfg.crash_at == Some(CrashPoint::AfterStoreWrite(self.batches_in_run)) {
            return Err(FulfilmentError::InjectedCrash(CrashPoint::AfterStoreWrite(
                self.batches_in_run,
            )));
        }
        // Waits for every output: pipelined delivery (outputs overlapping the next batch)
        // doubled orders/s but lost an output under injected broker faults in the processor's
        // test, so it stays off until that is explained (see BENCHMARKS.md).
        self.producer.deliver(&self.store, &entries)?;
        metrics::histogram!(m::BATCH_DURATION).record(started.elapsed().as_secs_f64());
        Ok(true)
    }

    /// Applies a changed partner file; an invalid one is reported and ignored (the running
    /// list stays), so a typo never stops fulfilment.
    fn maybe_reload(&mut self) -> Result<(), FulfilmentError> {
        let PartnersSource::File(path) = &self.cfg.partners else {
            return Ok(());
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                // Once per outage, not every interval.
                if !self.reload_failing {
                    tracing::warn!(path = %path.display(), error = %e, "cannot re-read the partner file; keeping the current list");
                }
                self.reload_failing = true;
                return Ok(());
            }
        };
        self.reload_failing = false;
        if text == self.partners_text {
            return Ok(());
        }
        let origin = path.display().to_string();
        self.partners_text = text;
        match crate::Partners::from_toml(&self.partners_text, &origin) {
            Err(e) => {
                metrics::counter!(m::RELOADS, "result" => "invalid").increment(1);
                tracing::error!(error = %e, "partner file changed but is invalid; keeping the current list");
                Ok(())
            }
            Ok(p) => {
                metrics::counter!(m::RELOADS, "result" => "applied").increment(1);
                self.stats.reloads.fetch_add(1, Ordering::Relaxed);
                let version = p.version.clone();
                let mut effects = std::mem::take(&mut self.effects);
                let allocated = self.ledger.set_partners(
                    p,
                    &mut Book {
                        store: &self.store,
                        overlay: &mut self.overlay,
                    },
                    &mut effects,
                );
                let allocated = allocated?;
                self.emit(&mut effects);
                self.effects = effects;
                tracing::info!(
                    version,
                    allocated,
                    backlog = self.ledger.backlog_len(),
                    "partner file reloaded"
                );
                self.commit()?;
                Ok(())
            }
        }
    }

    fn commit_kafka(&self, consumer: &BaseConsumer<LagContext>, mode: CommitMode) {
        if self.committed.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::with_capacity(self.committed.len());
        for (&(t, p), &o) in &self.committed {
            let _ = tpl.add_partition_offset(&self.inputs[t], p, Offset::Offset(o));
        }
        if let Err(e) = consumer.commit(&tpl, mode) {
            // Informational only (lag tools): the store holds the offsets that count.
            tracing::debug!(error = %e, "kafka offset commit failed");
        }
    }
}

fn validate(cfg: &FulfilmentConfig) -> Result<(), FulfilmentError> {
    let bad = |m: String| Err(FulfilmentError::Config(m));
    let t = &cfg.topics;
    let names = [
        ("trees", &t.trees),
        ("confirmations", &t.confirmations),
        ("orders", &t.orders),
        ("certificates", &t.certificates),
        ("dlq", &t.dlq),
    ];
    for (i, (role, name)) in names.iter().enumerate() {
        if name.is_empty() {
            return bad(format!("the {role} topic name must not be empty"));
        }
        if let Some((other, _)) = names[i + 1..].iter().find(|(_, n)| n == name) {
            return bad(format!(
                "topic {name:?} is configured as both {role} and {other}; each role needs its own topic"
            ));
        }
    }
    if cfg.batch_max_records == 0 {
        return bad("batch size must be at least 1".into());
    }
    if cfg.group_id.is_empty() {
        return bad("the consumer group id must not be empty".into());
    }
    Ok(())
}

/// Runs the fulfilment until `shutdown` is set (then commits and returns `Ok`) or a fatal error.
pub fn run(
    cfg: FulfilmentConfig,
    shutdown: Shutdown,
    stats: Arc<FulfilmentStats>,
) -> Result<(), FulfilmentError> {
    validate(&cfg)?;
    let (partners, partners_text) = cfg.partners.load()?;
    tracing::info!(version = %partners.version, partners = partners.partners.len(), "partner list loaded");
    forest_kafka::warn_if_new_store_but_group_progressed(
        !cfg.store_path.join("CURRENT").exists(),
        &cfg.store_path,
        &cfg.brokers,
        &cfg.group_id,
        &[&cfg.topics.trees, &cfg.topics.confirmations],
    );
    let store = Store::open(&cfg.store_path, &cfg.store)?;
    stats.health.set_store_open(true);
    let mut producer = OutboxProducer::new(&cfg.brokers, &cfg.kafka)?;
    producer.deliver_leftovers(&store)?;
    let ledger = Ledger::load(
        partners,
        &store.scan_kv(keys::USED)?,
        &store.scan_kv(keys::BACKLOG)?,
        store.get_kv(keys::META)?.as_deref(),
    )?;
    let inputs = [cfg.topics.trees.clone(), cfg.topics.confirmations.clone()];
    let mut svc = Service {
        inputs,
        store,
        producer,
        ledger,
        overlay: HashMap::new(),
        pending: Vec::new(),
        effects: Vec::new(),
        offsets: BTreeMap::new(),
        committed: BTreeMap::new(),
        batch_records: 0,
        batch_started: None,
        stats: stats.clone(),
        applied_in_run: 0,
        batches_in_run: 0,
        partners_text,
        reload_failing: false,
        cfg,
    };
    let cfg = svc.cfg.clone();

    // The partner list may have changed while we were down: the backlog gets a chance first.
    {
        let mut effects = Vec::new();
        let allocated = svc.ledger.retry_backlog(
            &mut Book {
                store: &svc.store,
                overlay: &mut svc.overlay,
            },
            None,
            &mut effects,
        );
        let allocated = allocated?;
        svc.emit(&mut effects);
        if allocated > 0 {
            tracing::info!(allocated, "backlog allocated at start-up");
        }
        svc.commit()?;
        let backlog = svc.ledger.backlog_len();
        stats.backlog.store(backlog as u64, Ordering::Relaxed);
        metrics::gauge!(m::BACKLOG).set(backlog as f64);
    }

    let consumer: BaseConsumer<LagContext> = client_config(&cfg.brokers, &[])
        .consumer_defaults()
        .set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Trees from a processor in transactions mode are visible only once their transaction
        // committed (librdkafka's default, stated here because the guarantee depends on it).
        .set("isolation.level", "read_committed")
        // Consumer lag per partition for metrics and /readyz.
        .set("statistics.interval.ms", "5000")
        .set_all(&cfg.kafka)
        .create_with_context(LagContext(stats.clone()))
        .map_err(|source| FulfilmentError::Kafka {
            op: "create consumer",
            source,
        })?;
    // Every partition of both inputs, at the offsets in the store (see the crate docs on why
    // this is not a group subscription).
    let mut tpl = TopicPartitionList::new();
    for (idx, topic) in svc.inputs.iter().enumerate() {
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(30))
            .map_err(|source| FulfilmentError::Kafka {
                op: "fetch metadata",
                source,
            })?;
        let partitions = md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        if partitions == 0 {
            return Err(FulfilmentError::MissingTopic {
                topic: topic.clone(),
            });
        }
        for p in 0..partitions as i32 {
            let stored = svc.store.offset(topic, p)?;
            if let Some(o) = stored {
                svc.committed.insert((idx, p), o);
                stats
                    .committed_offsets
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert((topic.clone(), p), o);
            }
            tpl.add_partition_offset(topic, p, stored.map_or(Offset::Beginning, Offset::Offset))
                .map_err(|source| FulfilmentError::Kafka {
                    op: "set start offset",
                    source,
                })?;
        }
    }
    consumer
        .assign(&tpl)
        .map_err(|source| FulfilmentError::Kafka {
            op: "assign",
            source,
        })?;
    stats.health.add_assigned(tpl.count() as i64);
    tracing::info!(inputs = ?svc.inputs, store = %cfg.store_path.display(), backlog = svc.ledger.backlog_len(), "fulfilment started");

    let mut last_reload = Instant::now();
    let mut last_export = Instant::now() - Duration::from_secs(5);
    while !shutdown.load(Ordering::Relaxed) {
        if last_reload.elapsed() >= cfg.reload_interval {
            last_reload = Instant::now();
            svc.maybe_reload()?;
        }
        if last_export.elapsed() >= Duration::from_secs(5) {
            last_export = Instant::now();
            svc.store.export_metrics();
        }
        let mut timeout = Duration::from_millis(50);
        for _ in 0..cfg
            .batch_max_records
            .saturating_sub(svc.batch_records)
            .max(1)
        {
            match consumer.poll(timeout) {
                None => break,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    break;
                }
                Some(Ok(msg)) => {
                    let input = if msg.topic() == svc.inputs[TREES] {
                        TREES
                    } else {
                        CONFIRMATIONS
                    };
                    svc.process(
                        input,
                        msg.partition(),
                        msg.offset(),
                        msg.key().unwrap_or_default(),
                        msg.payload().unwrap_or_default(),
                    )?;
                }
            }
            timeout = Duration::ZERO;
        }
        if svc.batch_records >= cfg.batch_max_records
            || svc
                .batch_started
                .is_some_and(|s| s.elapsed() >= cfg.batch_max_wait)
        {
            if svc.commit()? {
                svc.commit_kafka(&consumer, CommitMode::Async);
            }
        }
    }
    svc.commit()?;
    svc.producer.settle(Some(&svc.store), 0)?;
    svc.commit_kafka(&consumer, CommitMode::Sync);
    tracing::info!(
        backlog = svc.ledger.backlog_len(),
        "fulfilment stopped gracefully"
    );
    Ok(())
}

/// The fulfilment consumer's context: turns librdkafka statistics into consumer-lag metrics.
pub struct LagContext(Arc<FulfilmentStats>);

impl rdkafka::ClientContext for LagContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        self.0.health.record_lag(&statistics);
    }
}

impl rdkafka::consumer::ConsumerContext for LagContext {}
