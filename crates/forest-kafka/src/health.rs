//! What a service tells its `/healthz` and `/readyz` endpoints, and the consumer lag it reads
//! from librdkafka's statistics.
//!
//! Ready means: the store is open, this instance owns at least one partition, and its total
//! consumer lag is known and within a bound. A replica that owns no partitions (more replicas
//! than partitions) is alive but not ready, which is what a load balancer or a rolling update
//! should see.

use rdkafka::Statistics;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

/// Consumer lag per assigned partition, from librdkafka statistics (records).
pub const CONSUMER_LAG: &str = "forest_consumer_lag_records";
/// Partitions this process owns.
pub const ASSIGNED_PARTITIONS: &str = "forest_assigned_partitions";
/// 1 when `/readyz` would answer 200.
pub const READY: &str = "forest_ready";

pub fn describe() {
    use metrics::{Unit, describe_gauge};
    describe_gauge!(
        CONSUMER_LAG,
        Unit::Count,
        "Records between the partition's high watermark and the consumer's durable offset (stored locally with every durable batch, or committed to Kafka if later), by topic and partition (librdkafka statistics, every 5 s)."
    );
    describe_gauge!(
        ASSIGNED_PARTITIONS,
        Unit::Count,
        "Input partitions this process owns."
    );
    describe_gauge!(
        READY,
        Unit::Count,
        "1 if the process is ready (store open, partitions assigned, lag within bound), else 0."
    );
}

/// Liveness and readiness facts, shared by a service and its HTTP endpoints.
#[derive(Debug, Default)]
pub struct Health {
    store_open: AtomicBool,
    assigned: AtomicI64,
    lag: Mutex<BTreeMap<(String, i32), i64>>,
}

impl Health {
    pub fn set_store_open(&self, open: bool) {
        self.store_open.store(open, Ordering::Relaxed);
    }

    /// A rebalance gave (`delta` > 0) or took partitions.
    pub fn add_assigned(&self, delta: i64) {
        let n = self.assigned.fetch_add(delta, Ordering::Relaxed) + delta;
        metrics::gauge!(ASSIGNED_PARTITIONS).set(n.max(0) as f64);
    }

    /// Partitions (of all input topics) currently assigned to this process.
    pub fn assigned(&self) -> i64 {
        self.assigned.load(Ordering::Relaxed)
    }

    /// Partitions were revoked: forget their lag (its gauge goes to 0 so a moved partition
    /// does not keep reporting a stale lag here).
    pub fn forget_lag(&self) {
        let mut lag = self.lag.lock().unwrap_or_else(|p| p.into_inner());
        for ((topic, partition), _) in std::mem::take(&mut *lag) {
            metrics::gauge!(CONSUMER_LAG, "topic" => topic, "partition" => partition.to_string())
                .set(0.0);
        }
    }

    /// Records the lag of every partition the statistics show as assigned to this consumer.
    pub fn record_lag(&self, stats: &Statistics) {
        let mut lag = self.lag.lock().unwrap_or_else(|p| p.into_inner());
        for (name, topic) in &stats.topics {
            for (&p, part) in &topic.partitions {
                // -1 is librdkafka's internal "unassigned" partition; `desired` is false for
                // partitions this consumer does not own.
                if p < 0 || !part.desired {
                    continue;
                }
                // The lag from the offsets stored locally (with every durable batch) or, if
                // smaller, from those committed to Kafka (spaced, and the only ones a consumer
                // that stores none has); -1 where unknown.
                let known = [part.consumer_lag_stored, part.consumer_lag]
                    .into_iter()
                    .filter(|&l| l >= 0)
                    .min();
                if let Some(l) = known {
                    lag.insert((name.clone(), p), l);
                    metrics::gauge!(CONSUMER_LAG, "topic" => name.clone(), "partition" => p.to_string())
                        .set(l as f64);
                }
            }
        }
    }

    /// Total lag over the partitions with a known lag, and how many that is.
    pub fn lag(&self) -> (i64, usize) {
        let lag = self.lag.lock().unwrap_or_else(|p| p.into_inner());
        (lag.values().sum(), lag.len())
    }

    /// `Ok` if ready, else why not (the text `/readyz` answers).
    pub fn readiness(&self, max_lag: i64) -> Result<(), String> {
        let r = if !self.store_open.load(Ordering::Relaxed) {
            Err("the store is not open".to_string())
        } else if self.assigned.load(Ordering::Relaxed) <= 0 {
            Err("no partitions assigned".to_string())
        } else {
            let (total, _) = self.lag();
            if total > max_lag {
                Err(format!("consumer lag {total} records is over {max_lag}"))
            } else {
                Ok(())
            }
        };
        metrics::gauge!(READY).set(if r.is_ok() { 1.0 } else { 0.0 });
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_store_partitions_and_bounded_lag() {
        let h = Health::default();
        assert_eq!(h.readiness(10).unwrap_err(), "the store is not open");
        h.set_store_open(true);
        assert_eq!(h.readiness(10).unwrap_err(), "no partitions assigned");
        h.add_assigned(2);
        assert!(h.readiness(10).is_ok());
        h.lag.lock().unwrap().insert(("t".into(), 0), 11);
        assert!(h.readiness(10).unwrap_err().contains("lag 11"));
        h.forget_lag();
        assert!(h.readiness(10).is_ok());
        h.add_assigned(-2);
        assert!(h.readiness(10).is_err());
    }
}
