//! AMQP: deliveries from the consumer thread ([`crate::amqp`]) become tickets acked (or
//! rejected for redelivery) when their batch completes.

use super::{Intake, Throttle};
use crate::amqp::{self as consumer, AmqpConsumer, AmqpStatus};
use crate::dispatch::Ticket;
use crate::untrusted::{untrusted, Untrusted};

/// The worker's side of the AMQP consumer, if `[messaging] transport_url` is set.
pub struct AmqpSource {
    consumer: Option<AmqpConsumer>,
    log: Throttle,
    /// Deliveries acked and rejected (for redelivery), for the counters.
    pub acked: u64,
    pub rejected: u64,
}

impl AmqpSource {
    pub fn new(consumer: Option<AmqpConsumer>) -> AmqpSource {
        AmqpSource {
            consumer,
            log: Throttle::new(),
            acked: 0,
            rejected: 0,
        }
    }

    pub fn status(&self) -> Option<AmqpStatus> {
        self.consumer.as_ref().map(|a| a.status())
    }

    /// Take deliveries from the consumer thread while there is room.
    pub fn drain(&mut self, intake: &mut Intake) {
        while !intake.stopping || self.consumer.as_ref().is_some_and(|a| a.status().consuming) {
            if !intake.can_accept() {
                return;
            }
            let Some(d) = self.consumer.as_mut().and_then(|a| a.try_recv()) else {
                return;
            };
            intake.counters.amqp_deliveries += 1;
            intake.counters.by_source.amqp.bytes += d.body.len() as u64;
            match consumer::decode_envelope(&d.body) {
                Err(e) => {
                    intake.counters.amqp_malformed += 1;
                    self.log.log(log::Level::Warn, || {
                        format!(
                            "amqp: malformed message (delivery {}): {}; acked and dropped",
                            d.tag & 0xffff_ffff_ffff,
                            untrusted(&e)
                        )
                    });
                    self.ack(d.tag);
                }
                Ok((message_id, samples)) => {
                    let (range, rejected) = intake.ingest_all(samples, "amqp");
                    if rejected > 0 {
                        let id = message_id.unwrap_or_else(|| "?".into());
                        self.log.log(log::Level::Warn, || {
                            format!(
                                "amqp: message {}: {rejected} samples rejected",
                                Untrusted(&id)
                            )
                        });
                    }
                    intake.add_ticket(Ticket {
                        conn: usize::MAX,
                        serial: 0,
                        msgid: None,
                        amqp_tag: Some(d.tag),
                        range,
                        rejected,
                    });
                }
            }
        }
    }

    pub fn ack(&mut self, tag: u64) {
        if let Some(a) = self.consumer.as_mut() {
            a.ack(tag);
            self.acked += 1;
        }
    }

    pub fn reject(&mut self, tag: u64, requeue: bool) {
        if let Some(a) = self.consumer.as_mut() {
            a.reject(tag, requeue);
            self.rejected += 1;
        }
    }

    /// No new deliveries; those in flight are still committed and acked.
    pub fn stop_consuming(&mut self) {
        if let Some(a) = self.consumer.as_mut() {
            a.stop_consuming();
        }
    }

    /// Acks sent before go out first; unacked deliveries return to the queue.
    pub fn shutdown(&mut self) {
        if let Some(a) = self.consumer.take() {
            a.shutdown();
        }
    }

    pub fn is_some(&self) -> bool {
        self.consumer.is_some()
    }
}
