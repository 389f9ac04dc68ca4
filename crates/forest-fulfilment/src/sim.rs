//! A simulated planting partner, for the demo and the tests: it reads planting orders and
//! reports back, planting most trees and rejecting a configurable share of first attempts.
//!
//! Its answers are a pure function of the order (a hash of the idempotency key), so a
//! re-delivered order gets the same report, and a run is reproducible. Only first attempts
//! are rejected: a re-allocated tree is always planted, so the simulation converges.

use crate::{FulfilmentError, FulfilmentTopics, Shutdown};
use forest_kafka::{ClientConfigExt, client_config};
use forest_proto::v1::planting_confirmed::Result as Report;
use forest_proto::v1::{Planted, PlantingConfirmed, PlantingOrder, PlantingRejected};
use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct SimPartner {
    pub seed: u64,
    /// Share of first attempts rejected, in thousandths.
    pub reject_per_mille: u32,
}

impl Default for SimPartner {
    fn default() -> Self {
        Self {
            seed: 0,
            reject_per_mille: 50,
        }
    }
}

impl SimPartner {
    /// The partner's report on one order.
    pub fn respond(&self, order: &PlantingOrder) -> PlantingConfirmed {
        let h = xxhash_rust::xxh3::xxh3_64_with_seed(order.idempotency_key.as_bytes(), self.seed);
        let result = if order.attempt == 1 && (h % 1000) < u64::from(self.reject_per_mille) {
            Report::Rejected(PlantingRejected {
                reason: "site survey: plot unsuitable this season".into(),
            })
        } else {
            // Planted about a month after the order, in event time.
            let planted = order.created_at_ms.saturating_add(30 * 86_400_000);
            let planted_on = chrono::DateTime::from_timestamp_millis(planted)
                .map(|d| d.format("%Y-%m-%d").to_string())
                .unwrap_or_default();
            Report::Planted(Planted {
                site_id: order.site_id.clone(),
                plot: format!("P{:04}", (h >> 16) % 10_000),
                latitude: 0.0,
                longitude: 0.0,
                planted_on,
                tree_code: format!("{}-{:016x}", order.site_id, h),
            })
        };
        PlantingConfirmed {
            order_id: order.order_id.clone(),
            partner_id: order.partner_id.clone(),
            result: Some(result),
            reported_at_ms: order.created_at_ms,
            idempotency_key: order.idempotency_key.clone(),
        }
    }
}

#[derive(Debug, Default)]
pub struct SimStats {
    pub orders_seen: AtomicU64,
    pub planted: AtomicU64,
    pub rejected: AtomicU64,
}

/// Reads `topics.orders` from the beginning (group `group_id`) and answers every order on
/// `topics.confirmations`, keyed by order id, until `shutdown`.
pub fn run_partner(
    brokers: &str,
    kafka: &[(String, String)],
    group_id: &str,
    topics: &FulfilmentTopics,
    sim: SimPartner,
    shutdown: Shutdown,
    stats: &SimStats,
) -> Result<(), FulfilmentError> {
    let kafka_err = |op| move |source| FulfilmentError::Kafka { op, source };
    let consumer: BaseConsumer = client_config(brokers, &[])
        .consumer_defaults()
        .set("group.id", group_id)
        .set("auto.offset.reset", "earliest")
        .set_all(kafka)
        .create()
        .map_err(kafka_err("create consumer"))?;
    consumer
        .subscribe(&[&topics.orders])
        .map_err(kafka_err("subscribe"))?;
    let producer: BaseProducer = client_config(brokers, &[])
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set_all(kafka)
        .create()
        .map_err(kafka_err("create producer"))?;
    // At least once: reports are flushed before the next poll; the consumer's auto-commit
    // may run ahead of a flush only by what a crash would re-read anyway (deduped downstream).
    while !shutdown.load(Ordering::Relaxed) {
        let mut sent = 0;
        let mut timeout = Duration::from_millis(50);
        while sent < 1_000 {
            match consumer.poll(timeout) {
                None => break,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "partner simulator: consumer error");
                    break;
                }
                Some(Ok(msg)) => {
                    stats.orders_seen.fetch_add(1, Ordering::Relaxed);
                    let Ok(order) = PlantingOrder::decode(msg.payload().unwrap_or_default()) else {
                        tracing::warn!("partner simulator: undecodable order skipped");
                        continue;
                    };
                    let report = respond_counted(&sim, &order, stats).encode_to_vec();
                    let record = BaseRecord::to(&topics.confirmations)
                        .key(order.order_id.as_bytes())
                        .payload(&report);
                    forest_kafka::send_retrying(&producer, record).map_err(|source| {
                        FulfilmentError::Kafka {
                            op: "produce report",
                            source,
                        }
                    })?;
                    sent += 1;
                }
            }
            timeout = Duration::ZERO;
        }
        if sent > 0 {
            producer
                .flush(Duration::from_secs(60))
                .map_err(kafka_err("flush reports"))?;
        }
    }
    Ok(())
}

fn respond_counted(sim: &SimPartner, order: &PlantingOrder, stats: &SimStats) -> PlantingConfirmed {
    let r = sim.respond(order);
    match &r.result {
        Some(Report::Rejected(_)) => stats.rejected.fetch_add(1, Ordering::Relaxed),
        _ => stats.planted.fetch_add(1, Ordering::Relaxed),
    };
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(key: &str, attempt: u32) -> PlantingOrder {
        PlantingOrder {
            order_id: "order:u/1".into(),
            idempotency_key: key.into(),
            attempt,
            site_id: "s".into(),
            created_at_ms: 1_780_000_000_000,
            ..Default::default()
        }
    }

    #[test]
    fn answers_are_deterministic_and_only_first_attempts_are_rejected() {
        let sim = SimPartner {
            seed: 7,
            reject_per_mille: 300,
        };
        let mut rejected = 0;
        for i in 0..1000 {
            let o = order(&format!("order:u{i}/1#1"), 1);
            assert_eq!(sim.respond(&o), sim.respond(&o));
            if matches!(sim.respond(&o).result, Some(Report::Rejected(_))) {
                rejected += 1;
            }
            let again = order(&format!("order:u{i}/1#2"), 2);
            assert!(matches!(
                sim.respond(&again).result,
                Some(Report::Planted(_))
            ));
        }
        assert!((200..400).contains(&rejected), "{rejected} of 1000 at 30%");
        let Some(Report::Planted(p)) = sim.respond(&order("k", 2)).result else {
            panic!()
        };
        assert_eq!(p.planted_on, "2026-06-27");
    }
}
