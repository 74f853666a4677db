//! The topology side of the supervisor: replay on every new channel generation,
//! the application's declarations, consumers, deliveries and acks.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use super::channel::chan_id;
use super::{Command, Supervisor};
use crate::error::{ErrorClass, TransportError};
use crate::event::{Event, Reason};
use crate::ids::ChannelId;
use crate::message::{Delivery, FieldTable, SHORT_STRING_MAX, check_arguments, short_strings};
use crate::state::ChannelState;
use crate::telemetry::targets;
use crate::topology::{
    AckError, AckKind, ConsumeError, ConsumeOptions, ConsumerEntry, ConsumerId, Entity,
    ExchangeDecl, OpId, QueueDecl, QueueHandle, QueueRef, TopologyError, TopologyOp, UserOp,
    check_name,
};

/// How many cancelled consumers the client remembers, with the channel
/// generation each was on: what the broker delivers to them before it takes
/// the cancel goes back to the queue (if they ack), and never to a later
/// consumer given the same tag. Deliveries come right behind a cancel, so the
/// last few suffice.
pub(super) const CANCELLED_KEPT: usize = 64;

/// How long publishes wait at most for the broker to take the cancel of an
/// auto-ack consumer (see [`Hold`]).
const CANCEL_HOLD_MAX: Duration = Duration::from_secs(5);

/// An auto-ack consumer the application cancelled, whose cancel the broker has
/// not answered yet. A message published meanwhile could be routed to it and
/// count as delivered (auto-ack) while nobody reads it: lost. So no publish goes
/// out until the broker answers the cancel, the consumer's channel is gone, or
/// [`CANCEL_HOLD_MAX`] has passed. A consumer that acks needs none: what the
/// broker delivers to it after its cancel goes back to the queue.
#[derive(Debug)]
pub(super) struct Hold {
    consumer: CancelledTag,
    pub(super) until: Instant,
}

/// A consumer the application cancelled, as its deliveries name it.
#[derive(Debug)]
pub(super) struct Cancelled {
    consumer: CancelledTag,
    /// An auto-ack consumer's deliveries cannot be given back.
    no_ack: bool,
    /// The queue of a consumer that ran: an auto-delete one is forgotten when
    /// the broker answers the cancel, if no consumer of it remains then (one
    /// started meanwhile keeps it on the broker).
    queue: Option<QueueRef>,
}

/// A cancelled consumer as the broker knows it: its tag on one channel
/// generation.
#[derive(Debug, Clone)]
struct CancelledTag {
    channel: ChannelId,
    generation: u64,
    tag: String,
}

impl CancelledTag {
    fn is(&self, channel: ChannelId, generation: u64, tag: &str) -> bool {
        self.channel == channel && self.generation == generation && self.tag == tag
    }
}

/// One topology step queued on a channel generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// Replay registry entity `id`.
    Entity(u64),
    /// basic.qos for consumer `id` (before its basic.consume).
    Qos(u64),
    /// basic.consume for consumer `id`.
    Consume(u64),
    /// basic.cancel of a consumer the application cancelled.
    Cancel(String),
    /// The application's request `id`.
    User(u64),
}

/// The application's topology requests, run one at a time, in order.
#[derive(Debug, Default)]
pub(crate) struct UserOps {
    ops: BTreeMap<u64, (UserOp, Instant)>,
    queue: VecDeque<u64>,
    in_flight: Option<u64>,
    deadlines: BTreeSet<(Instant, u64)>,
    next: u64,
}

impl UserOps {
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(at, _)| *at)
    }

    fn push(&mut self, op: UserOp, deadline: Instant) -> OpId {
        self.next += 1;
        self.ops.insert(self.next, (op, deadline));
        self.queue.push_back(self.next);
        self.deadlines.insert((deadline, self.next));
        OpId(self.next)
    }

    fn take(&mut self, id: u64) -> Option<UserOp> {
        let (op, deadline) = self.ops.remove(&id)?;
        self.deadlines.remove(&(deadline, id));
        self.queue.retain(|&q| q != id);
        if self.in_flight == Some(id) {
            self.in_flight = None;
        }
        Some(op)
    }

    fn declares(&self, handle: QueueHandle) -> bool {
        self.ops
            .values()
            .any(|(op, _)| matches!(op, UserOp::DeclareQueue(h, _) if *h == handle))
    }
}

/// A consumer that ran before is given up after this many basic.consume
/// refusals in a row (one per reopen of its channel, which backs off).
pub const MAX_CONSUME_REFUSALS: u8 = 5;

/// A consumer that ran before and that the broker refuses as "in exclusive
/// use" is tried again for this long before it ends (or for three heartbeat
/// intervals, if a host's URI asks for a longer `heartbeat`). After a silent
/// network failure the broker still holds the dead connection's exclusive
/// subscription until its heartbeat check drops that connection: after up to
/// two intervals, 60 s each by default in RabbitMQ.
pub const EXCLUSIVE_USE_GRACE: Duration = Duration::from_secs(180);

/// The first wait before such a consumer is tried again; each next wait is as
/// long as the refusals have lasted so far (about doubling), up to
/// `EXCLUSIVE_USE_RETRY_MAX`. Its channel replays without it
/// meanwhile, so it publishes and runs its other consumers; each try the broker
/// refuses closes that channel once more.
const EXCLUSIVE_USE_RETRY_FIRST: Duration = Duration::from_secs(1);
const EXCLUSIVE_USE_RETRY_MAX: Duration = Duration::from_secs(16);

/// Whether the broker refused a basic.consume because another connection holds
/// an exclusive consumer on the queue (RabbitMQ: 403 "... in exclusive use").
fn in_exclusive_use(error: &TransportError) -> bool {
    matches!(error, TransportError::Reply { code: 403, text } if text.contains("exclusive use"))
}

/// Whether the broker refused a declaration because the entity exists with
/// other properties or arguments (RabbitMQ: 406 "inequivalent arg ..."). Not
/// every 406 says so: a queue.declare past the vhost's or the cluster's queue
/// limit is refused with 406 too ("queue limit ... is reached"), while the
/// queue does not exist, until other queues go.
fn inequivalent(error: &TransportError) -> bool {
    matches!(error, TransportError::Reply { code: 406, text } if text.contains("inequivalent arg"))
}

/// A binding or an exchange declaration whose replay the broker refuses this
/// many times in a row (a binding to an exchange another application deleted,
/// an exchange redeclared elsewhere with other properties) is dropped from the
/// topology ([`Event::ReplayAbandoned`]): replayed first on its connection,
/// it would otherwise hold every channel of that connection from Ready for
/// good. So is the declaration of a fixed-name queue refused with 406
/// "inequivalent arg" (another application declared it again with other
/// arguments) that many times in a row, which is left out of the replay: the
/// queue keeps its name, so its bindings and consumers still go to the queue
/// the broker has. (A 406 for the queue limit, like a 404 or a 405, does not
/// count: the queue is declared when the broker lets it.)
pub const MAX_REPLAY_REFUSALS: u8 = 5;

fn broker_error(e: &TransportError) -> TopologyError {
    match e {
        TransportError::Reply { code, text } => TopologyError::Broker {
            code: *code,
            text: text.clone(),
        },
        other => TopologyError::Transport(other.clone()),
    }
}

impl Supervisor {
    // ----- replay -----

    /// The channel opened: queue its replay (entities on channel 0, then the
    /// consumers that live on it) and run it; Ready when it drains.
    pub(super) fn start_replay(&mut self, c: usize, i: usize) {
        // consumers cancelled while the channel was down count once, here
        let lost: Vec<u64> = self
            .lost_with_channel
            .iter()
            .filter(|&&(c2, i2, _)| (c2, i2) == (c, i))
            .map(|&(.., queue)| queue)
            .collect();
        self.lost_with_channel
            .retain(|&(c2, i2, _)| (c2, i2) != (c, i));
        if i != 0 && !self.conns[c].topology_ready {
            self.set_chan_state(c, i, ChannelState::AwaitingTopology, Reason::ChannelOpened);
            return;
        }
        let mut steps = VecDeque::new();
        let conn_ready = self.conns[c].topology_ready;
        if i == 0 && !conn_ready {
            steps.extend(self.registry.replay_plan(c).into_iter().map(Step::Entity));
        }
        let ch = &self.conns[c].channels[i];
        if conn_ready && ch.prev_epoch == ch.epoch {
            // Only this channel was reopened: the connection's entities still
            // exist, except an auto-delete queue whose consumers all lived on this
            // channel (the broker deleted it with them). Declare those again, with
            // their bindings, before the consumers come back.
            for queue in self.orphaned_auto_delete_queues(c, i, &lost) {
                steps.push_back(Step::Entity(queue));
                steps.extend(
                    self.registry
                        .bindings_of(queue)
                        .into_iter()
                        .map(Step::Entity),
                );
            }
        }
        for (&id, consumer) in &self.registry.consumers {
            // one waiting to be tried again (in exclusive use) is not replayed
            if consumer.conn == Some(c) && consumer.chan == Some(i) && consumer.retry_at.is_none() {
                steps.push_back(Step::Qos(id));
                steps.push_back(Step::Consume(id));
            }
        }
        let span = tracing::debug_span!(
            target: targets::TOPOLOGY,
            "replay",
            channel = %chan_id(c, i),
            generation = self.conns[c].channels[i].generation,
            steps = steps.len(),
            outcome = tracing::field::Empty,
            duration_ms = tracing::field::Empty,
        );
        let total = u32::try_from(steps.len()).unwrap_or(u32::MAX);
        let ch = &mut self.conns[c].channels[i];
        ch.current.steps = steps;
        ch.current.replay = (!span.is_disabled()).then_some((span, self.now));
        self.set_chan_state(
            c,
            i,
            ChannelState::Replaying { done: 0, total },
            Reason::ChannelOpened,
        );
        self.kick(c, i);
    }

    /// Auto-delete queue entities all of whose consumers live on channel (c, i)
    /// (not those left out of the replay: `Registry::undeclared`). Only
    /// consumers the broker had count: one never subscribed yet (started
    /// while the channel was down) took nothing with it, so the broker did
    /// not delete its queue (declared again, a server-named one would get a
    /// new name and the old one would stay, with its bindings). One the
    /// application cancelled while the channel was down (`lost`: its queue)
    /// still counts: the broker had it, and it took the queue with it.
    fn orphaned_auto_delete_queues(&self, c: usize, i: usize, lost: &[u64]) -> Vec<u64> {
        let mut here: BTreeMap<u64, bool> = BTreeMap::new();
        for &queue in lost {
            if self.registry.is_auto_delete_queue(queue)
                && !self.registry.undeclared.contains(&queue)
            {
                here.insert(queue, true);
            }
        }
        for k in self.registry.consumers.values() {
            if k.subscribed.is_none() {
                continue;
            }
            let Some(queue) = self.registry.queue_entity_id(&k.queue) else {
                continue;
            };
            // one left out of the replay is the broker's queue, declared by
            // another application: declared again, it is refused (406) at every
            // reopen of the channel
            if !self.registry.is_auto_delete_queue(queue)
                || self.registry.undeclared.contains(&queue)
            {
                continue;
            }
            let on_this = k.conn == Some(c) && k.chan == Some(i);
            let all = here.entry(queue).or_insert(true);
            *all &= on_this;
        }
        here.into_iter()
            .filter(|(_, all)| *all)
            .map(|(q, _)| q)
            .collect()
    }

    /// Whether the application's delete (or unbind) in flight has gone out on
    /// a channel other than (c, i) and removes entity `id`: a step for it sent
    /// on (c, i) now would reach the broker after the delete. (A delete
    /// queued, or sent on (c, i) itself, comes after such a step.)
    fn deleted_elsewhere(&self, id: u64, c: usize, i: usize) -> bool {
        let Some(delete) = self.user_ops.in_flight else {
            return false;
        };
        let sent_elsewhere = self.conns.iter().enumerate().any(|(c2, conn)| {
            conn.channels.iter().enumerate().any(|(i2, ch)| {
                (c2, i2) != (c, i) && ch.current.step_in_flight == Some(Step::User(delete))
            })
        });
        sent_elsewhere && self.deleted_in_flight(id)
    }

    /// Whether the application's request in flight deletes entity `id`: what
    /// the registry drops with it (the queue or exchange itself, a binding to
    /// or from it, the binding an unbind names), or an auto-delete exchange
    /// whose every binding as a source it removes (the broker deletes that
    /// exchange with its last binding).
    fn deleted_in_flight(&self, id: u64) -> bool {
        let Some((op, _)) = self
            .user_ops
            .in_flight
            .and_then(|op| self.user_ops.ops.get(&op))
        else {
            return false;
        };
        let removed = self.registry.removed_by(op);
        if removed.contains(&id) {
            return true;
        }
        let Some(Entity::Exchange(decl)) = self.registry.entities.get(&id) else {
            return false;
        };
        let unbinds = removed
            .iter()
            .filter_map(|b| self.registry.entities.get(b))
            .filter(|b| b.binding_source() == Some(decl.name.as_str()))
            .count();
        decl.auto_delete
            && unbinds > 0
            && self.registry.binding_sources().get(&decl.name) == Some(&unbinds)
    }

    /// Issues the channel's next topology step if none is in flight; finishes the
    /// replay when none is left.
    pub(super) fn kick(&mut self, c: usize, i: usize) {
        loop {
            let ch = &mut self.conns[c].channels[i];
            if ch.current.step_in_flight.is_some() || !ch.state.runs_steps() {
                return;
            }
            let Some(step) = ch.current.steps.pop_front() else {
                if matches!(ch.state, ChannelState::Replaying { .. }) {
                    self.replay_finished(c, i);
                }
                return;
            };
            // A replay step for what a delete (or an unbind) in flight removes
            // would reach the broker after it (on another connection) and
            // bring it back for good, the registry having forgotten it: it is
            // skipped, as the answer removes its subject; if the request
            // fails, it runs after all.
            let doomed = match &step {
                Step::Entity(id) => self.deleted_elsewhere(*id, c, i),
                Step::Consume(id) => self.registry.consumers.get(id).is_some_and(|k| {
                    self.registry
                        .queue_entity_id(&k.queue)
                        .is_some_and(|q| self.deleted_elsewhere(q, c, i))
                }),
                _ => false,
            };
            if doomed && let Some(delete) = self.user_ops.in_flight {
                let generation = self.conns[c].channels[i].generation;
                self.skipped_for_delete
                    .push((delete, c, i, generation, step));
                continue;
            }
            let op = match &step {
                Step::Entity(id) => self.registry.replay_op(*id),
                Step::Qos(id) => self.registry.consumers.get(id).map(|k| TopologyOp::Qos {
                    prefetch_count: k.options.prefetch.unwrap_or(0),
                }),
                Step::Consume(id) => self.registry.consumers.get(id).and_then(|k| {
                    Some(TopologyOp::Consume {
                        queue: self.registry.resolve(&k.queue)?,
                        consumer_tag: k.tag.clone(),
                        // the Qos step before it applied the prefetch already:
                        // transports must not send a second basic.qos
                        options: ConsumeOptions {
                            prefetch: None,
                            ..k.options.clone()
                        },
                    })
                }),
                Step::Cancel(tag) => Some(TopologyOp::Cancel {
                    consumer_tag: tag.clone(),
                }),
                Step::User(id) => match self.user_ops.ops.get(id) {
                    Some((op, _)) => match self.registry.user_op(op) {
                        Ok(op) => Some(op),
                        Err(e) => {
                            self.resolve_user_op(*id, Err(e));
                            None
                        }
                    },
                    None => None,
                },
            };
            let Some(op) = op else {
                continue; // its subject is gone: nothing to do for it
            };
            let ch = &mut self.conns[c].channels[i];
            ch.current.step_in_flight = Some(step);
            let generation = ch.generation;
            self.commands.push_back(Command::Topology {
                channel: chan_id(c, i),
                generation,
                op,
            });
            self.replay_progress(c, i);
            return;
        }
    }

    fn replay_finished(&mut self, c: usize, i: usize) {
        if let Some((span, started)) = self.conns[c].channels[i].current.replay.take() {
            span.record("outcome", "ok");
            span.record(
                "duration_ms",
                self.now.saturating_duration_since(started).as_secs_f64() * 1e3,
            );
        }
        self.channel_ready(c, i);
        if i == 0 {
            self.conns[c].topology_ready = true;
            for j in 1..self.conns[c].channels.len() {
                if self.conns[c].channels[j].state == ChannelState::AwaitingTopology {
                    self.start_replay(c, j);
                }
            }
        }
        self.dispatch_user_ops();
    }

    pub(super) fn on_topology_done(
        &mut self,
        channel: ChannelId,
        generation: u64,
        result: Result<Option<String>, TransportError>,
    ) {
        let Some((c, i)) = self.current_chan(channel, generation) else {
            return;
        };
        let Some(step) = self.conns[c].channels[i].current.step_in_flight.take() else {
            return;
        };
        self.conns[c].channels[i].current.steps_done += 1;
        self.replay_progress(c, i);
        match result {
            Ok(name) => {
                match step {
                    Step::Entity(id) => {
                        self.replay_refusals.remove(&id);
                        self.registry.undeclared.remove(&id);
                        if let Some(new) = name
                            && let Some((queue, old)) = self.registry.renamed(id, &new)
                            && !old.is_empty()
                        {
                            tracing::info!(
                                target: targets::TOPOLOGY,
                                client = self.name(),
                                %old,
                                %new,
                                "server-named queue re-created under a new name"
                            );
                            self.events
                                .push_back(Event::QueueRenamed { queue, old, new });
                        }
                        if let Some(waiting) = self.registry.redeclaring.remove(&id) {
                            for (consumer, cancel_first) in waiting {
                                self.resubscribe(consumer, cancel_first);
                            }
                        }
                    }
                    Step::Consume(id) => {
                        let name = self
                            .registry
                            .consumers
                            .get(&id)
                            .and_then(|k| self.registry.resolve(&k.queue));
                        if let Some(k) = self.registry.consumers.get_mut(&id) {
                            k.subscribed = name;
                            k.refusals = 0;
                            k.exclusive_since = None;
                            if !std::mem::replace(&mut k.started, true) {
                                self.consume_waits.retain(|&(_, w)| w != id);
                                self.events.push_back(Event::ConsumeResolved {
                                    consumer: ConsumerId(id),
                                    result: Ok(()),
                                });
                            }
                        }
                    }
                    Step::User(id) => {
                        if let Some((op, _)) = self.user_ops.ops.get(&id) {
                            let op = op.clone();
                            self.registry.apply(&op, name.as_deref(), c);
                            self.end_orphaned_redeclarations();
                            self.resolve_user_op(id, Ok(name));
                            self.assign_consumers();
                        }
                    }
                    Step::Cancel(tag) => self.cancel_answered(c, i, &tag),
                    Step::Qos(_) => {}
                }
                self.kick(c, i);
                self.dispatch_user_ops();
            }
            Err(error) => {
                self.step_failed(c, i, &step, &error);
                self.channel_failed(c, i, error);
                self.dispatch_user_ops();
            }
        }
    }

    /// The broker closed connection `c` for a command it refuses (501
    /// FRAME_ERROR such as a method frame past `frame_max`, 502 SYNTAX_ERROR,
    /// 503 COMMAND_INVALID such as an exchange type it does not know, 540
    /// NOT_IMPLEMENTED). When one topology step was in flight on the
    /// connection, that step is the command: it fails with the broker's reply
    /// rather than go back to the queue (sent again after the reconnect, it would
    /// close the connection again). With several in flight the culprit is not
    /// known, and they all go back; so do they for a 501 while a publish awaits
    /// its confirm on the connection (an oversized publish draws one too).
    pub(super) fn blame_the_command(&mut self, c: usize, error: &TransportError) {
        if !self.refused_command(c, error) {
            return;
        }
        let mut in_flight = self.conns[c]
            .channels
            .iter()
            .enumerate()
            .filter(|(_, ch)| ch.current.step_in_flight.is_some())
            .map(|(i, _)| i);
        if let (Some(i), None) = (in_flight.next(), in_flight.next())
            && let Some(step) = self.conns[c].channels[i].current.step_in_flight.take()
        {
            self.step_failed(c, i, &step, error);
        }
    }

    /// A step failed with `error` on channel (c, i), which closes: a request the
    /// broker refused resolves with the broker's reply (any other failure runs it
    /// again elsewhere); a replay step is reported (the next replay runs it again).
    pub(super) fn step_failed(&mut self, c: usize, i: usize, step: &Step, error: &TransportError) {
        match step {
            Step::User(id) if error.reply_code().is_some() => {
                self.resolve_user_op(*id, Err(broker_error(error)));
            }
            Step::User(_) => {
                // not the broker's verdict: run it again elsewhere
                self.user_ops_back(std::slice::from_ref(step));
            }
            // a consume the broker closed the connection for is refused too
            // (replayed, it would close the connection again at every
            // reconnect), when it was the one command in flight there
            Step::Consume(id)
                if error.class() != ErrorClass::Transient
                    || (self.refused_command(c, error)
                        && self.conns[c]
                            .channels
                            .iter()
                            .all(|ch| ch.current.step_in_flight.is_none())) =>
            {
                self.stats.replay_failures += 1;
                self.consume_refused(*id, error);
            }
            Step::Entity(id) if matches!(error, TransportError::Reply { .. }) => {
                self.stats.replay_failures += 1;
                // counts of entities the application has since removed go
                let entities = &self.registry.entities;
                self.replay_refusals
                    .retain(|id, _| entities.contains_key(id));
                let queue = matches!(self.registry.entities.get(id), Some(Entity::Queue { .. }));
                let refusals = if queue && !inequivalent(error) {
                    // a queue is left out after "inequivalent arg" refusals in
                    // a row only: the others (405, 404, a 406 for the queue
                    // limit) come back, and do not count
                    self.replay_refusals.remove(id);
                    0
                } else {
                    let refusals = self.replay_refusals.entry(*id).or_insert(0);
                    *refusals = refusals.saturating_add(1);
                    *refusals
                };
                let droppable = matches!(
                    self.registry.entities.get(id),
                    Some(
                        Entity::QueueBinding { .. }
                            | Entity::ExchangeBinding { .. }
                            | Entity::Exchange(_)
                    )
                );
                // A fixed-name queue that the broker has with other properties
                // or arguments (406 "inequivalent arg": another application
                // declared it again) is left out of the replay instead: its
                // bindings and consumers still name the queue the broker has.
                // Other refusals hold on: 405, an exclusive queue a dead
                // connection of this client still holds, 404, a durable queue
                // whose node is down, and a 406 for the queue limit (the queue
                // is not there) all come back.
                let undeclarable = inequivalent(error)
                    && matches!(
                        self.registry.entities.get(id),
                        Some(Entity::Queue { decl, .. }) if !decl.is_server_named()
                    );
                let described = self.describe(step);
                if (undeclarable || droppable) && refusals >= MAX_REPLAY_REFUSALS {
                    let outcome = if undeclarable {
                        // left out of the replay; ids of queues deleted since
                        // are pruned here, so the set holds live queues only
                        let entities = &self.registry.entities;
                        self.registry
                            .undeclared
                            .retain(|id| entities.contains_key(id));
                        self.registry.undeclared.insert(*id);
                        "queue declaration refused again and again: no longer replayed"
                    } else {
                        self.registry.entities.remove(id);
                        "topology replay step refused again and again: dropped"
                    };
                    self.replay_refusals.remove(id);
                    tracing::warn!(
                        target: targets::TOPOLOGY,
                        client = self.name(),
                        channel = %chan_id(c, i),
                        step = %described,
                        %error,
                        refusals,
                        "{outcome}"
                    );
                    self.events.push_back(Event::ReplayAbandoned {
                        step: described,
                        error: error.clone(),
                    });
                } else {
                    self.report_replay_failure(c, i, described, error);
                }
            }
            _ => {
                self.stats.replay_failures += 1;
                let step = self.describe(step);
                self.report_replay_failure(c, i, step, error);
            }
        }
    }

    /// A replay step failed on channel (c, i); the replay starts over when the
    /// channel reopens.
    fn report_replay_failure(&mut self, c: usize, i: usize, step: String, error: &TransportError) {
        tracing::warn!(
            target: targets::TOPOLOGY,
            client = self.name(),
            channel = %chan_id(c, i),
            %step,
            %error,
            "topology replay step failed"
        );
        self.events.push_back(Event::ReplayFailed {
            channel: chan_id(c, i),
            step,
            error: error.clone(),
        });
    }

    /// The broker refused basic.consume for consumer `id`. A consumer the
    /// application just started ends with the refusal (its caller hears it); one
    /// that ran before is retried with each reopen of its channel (the queue may
    /// come back: a node restarting), and ends after
    /// [`MAX_CONSUME_REFUSALS`] refusals in a row. One refused as "in exclusive
    /// use" (a dead connection of this client may still hold it) leaves its
    /// channel's replay and is tried again on a timer, until it has been refused
    /// so for [`EXCLUSIVE_USE_GRACE`].
    fn consume_refused(&mut self, id: u64, error: &TransportError) {
        let now = self.now;
        let grace = self.exclusive_use_grace();
        let Some(k) = self.registry.consumers.get_mut(&id) else {
            return;
        };
        let exclusive = k.started && in_exclusive_use(error);
        let retry_at = if exclusive {
            // the dead connection's subscription goes when the broker notices
            // it: wait for that, by time rather than by count
            let since = *k.exclusive_since.get_or_insert(now);
            let waited = now.saturating_duration_since(since);
            // waiting as long again as it has waited doubles the wait
            (waited < grace)
                .then(|| now + waited.clamp(EXCLUSIVE_USE_RETRY_FIRST, EXCLUSIVE_USE_RETRY_MAX))
        } else {
            k.exclusive_since = None;
            None
        };
        // those end by time, not by count
        if !exclusive {
            k.refusals = k.refusals.saturating_add(1);
        }
        let (started, refusals) = (k.started, k.refusals);
        if let Some(at) = retry_at {
            k.retry_at = Some(at);
            self.timers.insert((at, super::TimerKey::Consumer(id)));
        }
        let reason = match error {
            TransportError::Reply { code, text } => ConsumeError::Broker {
                code: *code,
                text: text.clone(),
            },
            other => ConsumeError::Transport(other.clone()),
        };
        if started && (retry_at.is_some() || (!exclusive && refusals < MAX_CONSUME_REFUSALS)) {
            let step = self.describe(&Step::Consume(id));
            self.events.push_back(Event::ReplayFailed {
                channel: self
                    .registry
                    .consumers
                    .get(&id)
                    .and_then(|k| Some(chan_id(k.conn?, k.chan?)))
                    .unwrap_or(chan_id(0, 0)),
                step,
                error: error.clone(),
            });
            return;
        }
        if let Some(k) = self.registry.consumers.remove(&id) {
            self.registry.tags.remove(&k.tag);
        }
        self.consume_waits.retain(|&(_, w)| w != id);
        tracing::warn!(
            target: targets::TOPOLOGY,
            client = self.name(),
            consumer = id,
            %error,
            started,
            "consumer refused by the broker: ended"
        );
        self.events.push_back(if started {
            Event::ConsumerEnded {
                consumer: ConsumerId(id),
                error: reason,
            }
        } else {
            Event::ConsumeResolved {
                consumer: ConsumerId(id),
                result: Err(reason),
            }
        });
    }

    /// First consumes not answered by their deadline end.
    pub(super) fn expire_consume_waits(&mut self) {
        while let Some(&(at, id)) = self.consume_waits.first() {
            if at > self.now {
                break;
            }
            self.consume_waits.pop_first();
            let Some(k) = self.registry.consumers.get(&id) else {
                continue;
            };
            if k.started {
                continue;
            }
            let _ = self.cancel(self.now, ConsumerId(id));
            self.events.push_back(Event::ConsumeResolved {
                consumer: ConsumerId(id),
                result: Err(ConsumeError::TimedOut),
            });
        }
    }

    fn describe(&self, step: &Step) -> String {
        match step {
            Step::Entity(id) => match self.registry.replay_op(*id) {
                Some(op) => format!("{op:?}"),
                None => "a deleted entity".into(),
            },
            Step::Qos(id) => format!("basic.qos for consumer {id}"),
            Step::Consume(id) => match self.registry.consumers.get(id) {
                Some(k) => format!("basic.consume {:?} on {:?}", k.tag, k.queue),
                None => format!("basic.consume for consumer {id}"),
            },
            Step::Cancel(tag) => format!("basic.cancel {tag:?}"),
            Step::User(id) => format!("request {id}"),
        }
    }

    // ----- the application's requests -----

    /// Declares an exchange; recorded for replay once the broker accepts it.
    pub fn declare_exchange(
        &mut self,
        now: Instant,
        decl: ExchangeDecl,
    ) -> Result<OpId, TopologyError> {
        if decl.name.is_empty() {
            return Err(TopologyError::Invalid(
                "an exchange needs a name (\"\" is the default exchange)".into(),
            ));
        }
        if decl.name.starts_with("amq.") {
            return Err(TopologyError::Invalid(format!(
                "exchange names starting with \"amq.\" are reserved ({:?})",
                decl.name
            )));
        }
        check_name("exchange name", &decl.name).map_err(TopologyError::Invalid)?;
        if decl.kind.as_str().is_empty() {
            return Err(TopologyError::Invalid("empty exchange type".into()));
        }
        self.check_arguments(
            "exchange arguments",
            &decl.arguments,
            short_strings(&[&decl.name, decl.kind.as_str()]),
        )?;
        self.user_request(now, UserOp::DeclareExchange(decl))
    }

    /// Deletes an exchange and forgets it (and its bindings).
    pub fn delete_exchange(&mut self, now: Instant, name: &str) -> Result<OpId, TopologyError> {
        check_name("exchange name", name).map_err(TopologyError::Invalid)?;
        self.user_request(now, UserOp::DeleteExchange(name.to_string()))
    }

    /// Declares a queue. The handle names it from now on, also after a
    /// server-named queue is re-created under a new name.
    pub fn declare_queue(
        &mut self,
        now: Instant,
        decl: QueueDecl,
    ) -> Result<(OpId, QueueHandle), TopologyError> {
        if decl.name.starts_with("amq.") {
            return Err(TopologyError::Invalid(format!(
                "queue names starting with \"amq.\" are reserved ({:?}); declare \"\" for a server-named queue",
                decl.name
            )));
        }
        check_name("queue name", &decl.name).map_err(TopologyError::Invalid)?;
        self.check_arguments(
            "queue arguments",
            &decl.arguments,
            short_strings(&[&decl.name]),
        )?;
        let handle = self.registry.new_handle();
        let op = self.user_request(now, UserOp::DeclareQueue(handle, decl))?;
        Ok((op, handle))
    }

    /// Deletes a queue and forgets it (and its bindings).
    pub fn delete_queue(&mut self, now: Instant, queue: QueueRef) -> Result<OpId, TopologyError> {
        self.check_queue(&queue)?;
        self.user_request(now, UserOp::DeleteQueue(queue))
    }

    /// Binds a queue to an exchange.
    pub fn bind_queue(
        &mut self,
        now: Instant,
        queue: QueueRef,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<OpId, TopologyError> {
        self.queue_binding(now, queue, exchange, routing_key, arguments, true)
    }

    /// Removes a queue binding.
    pub fn unbind_queue(
        &mut self,
        now: Instant,
        queue: QueueRef,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<OpId, TopologyError> {
        self.queue_binding(now, queue, exchange, routing_key, arguments, false)
    }

    fn queue_binding(
        &mut self,
        now: Instant,
        queue: QueueRef,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
        bind: bool,
    ) -> Result<OpId, TopologyError> {
        self.check_queue(&queue)?;
        check_name("exchange name", exchange).map_err(TopologyError::Invalid)?;
        check_name("routing key", routing_key).map_err(TopologyError::Invalid)?;
        self.check_arguments(
            "binding arguments",
            &arguments,
            queue_name_size(&queue) + short_strings(&[exchange, routing_key]),
        )?;
        self.user_request(
            now,
            UserOp::BindQueue {
                queue,
                exchange: exchange.to_string(),
                routing_key: routing_key.to_string(),
                arguments,
                bind,
            },
        )
    }

    /// Binds exchange `destination` to exchange `source`.
    pub fn bind_exchange(
        &mut self,
        now: Instant,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<OpId, TopologyError> {
        self.exchange_binding(now, destination, source, routing_key, arguments, true)
    }

    /// Removes an exchange-to-exchange binding.
    pub fn unbind_exchange(
        &mut self,
        now: Instant,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<OpId, TopologyError> {
        self.exchange_binding(now, destination, source, routing_key, arguments, false)
    }

    fn exchange_binding(
        &mut self,
        now: Instant,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
        bind: bool,
    ) -> Result<OpId, TopologyError> {
        for (what, name) in [
            ("destination exchange", destination),
            ("source exchange", source),
            ("routing key", routing_key),
        ] {
            check_name(what, name).map_err(TopologyError::Invalid)?;
        }
        self.check_arguments(
            "binding arguments",
            &arguments,
            short_strings(&[destination, source, routing_key]),
        )?;
        self.user_request(
            now,
            UserOp::BindExchange {
                destination: destination.to_string(),
                source: source.to_string(),
                routing_key: routing_key.to_string(),
                arguments,
                bind,
            },
        )
    }

    /// The current name of a declared queue (`None` before its declaration is
    /// accepted, or after it is deleted).
    pub fn queue_name(&self, handle: QueueHandle) -> Option<String> {
        self.registry
            .resolve(&QueueRef::Handle(handle))
            .filter(|name| !name.is_empty())
    }

    /// [`check_arguments`] against the client's `frame_max`.
    fn check_arguments(
        &self,
        what: &str,
        arguments: &FieldTable,
        names: usize,
    ) -> Result<(), TopologyError> {
        check_arguments(what, arguments, names, self.frame_max).map_err(TopologyError::Invalid)
    }

    fn check_queue(&self, queue: &QueueRef) -> Result<(), TopologyError> {
        match queue {
            QueueRef::Named(name) if name.is_empty() => {
                Err(TopologyError::Invalid(EMPTY_QUEUE_NAME.into()))
            }
            QueueRef::Named(name) => check_name("queue name", name).map_err(TopologyError::Invalid),
            QueueRef::Handle(h) if self.registry.has_handle(*h) || self.user_ops.declares(*h) => {
                Ok(())
            }
            QueueRef::Handle(h) => Err(TopologyError::UnknownQueue(*h)),
        }
    }

    fn user_request(&mut self, now: Instant, mut op: UserOp) -> Result<OpId, TopologyError> {
        self.advance(now);
        // a draining close takes nothing new either
        if self.is_closing() {
            return Err(TopologyError::Closed);
        }
        if let UserOp::DeleteQueue(queue) | UserOp::BindQueue { queue, .. } = &mut op {
            *queue = self.registry.canonical(queue);
        }
        let deadline = super::deadline_after(self.now, self.config.publish_timeout);
        let id = self.user_ops.push(op, deadline);
        self.dispatch_user_ops();
        Ok(id)
    }

    /// Runs the oldest waiting request on a Ready channel (on the connection that
    /// owns its queue, if any), one at a time, so requests run in order.
    pub(super) fn dispatch_user_ops(&mut self) {
        if self.closed || self.user_ops.in_flight.is_some() {
            return;
        }
        let Some(&id) = self.user_ops.queue.front() else {
            return;
        };
        let owner = match self.user_ops.ops.get(&id).map(|(op, _)| op) {
            Some(UserOp::DeleteQueue(q)) | Some(UserOp::BindQueue { queue: q, .. }) => {
                self.registry.owner(q)
            }
            // a fixed-name queue declared again: an exclusive one is locked
            // to the connection that has it (405 on any other)
            Some(UserOp::DeclareQueue(_, decl)) if !decl.is_server_named() => {
                self.registry.owner(&QueueRef::Named(decl.name.clone()))
            }
            _ => None,
        };
        let target = self.conns.iter().enumerate().find_map(|(c, conn)| {
            if owner.is_some_and(|o| o != c) || !conn.state.is_ready() {
                return None;
            }
            conn.channels
                .iter()
                .position(|ch| ch.state == ChannelState::Ready)
                .map(|i| (c, i))
        });
        let Some((c, i)) = target else {
            return; // waits for a Ready channel (or its deadline)
        };
        self.user_ops.queue.pop_front();
        self.user_ops.in_flight = Some(id);
        self.conns[c].channels[i]
            .current
            .steps
            .push_back(Step::User(id));
        self.kick(c, i);
    }

    /// Requests whose channel went away before an answer go back to the front.
    pub(super) fn user_ops_back(&mut self, steps: &[Step]) {
        for step in steps.iter().rev() {
            if let Step::User(id) = step
                && self.user_ops.ops.contains_key(id)
            {
                if self.user_ops.in_flight == Some(*id) {
                    self.user_ops.in_flight = None;
                }
                if !self.user_ops.queue.contains(id) {
                    self.user_ops.queue.push_front(*id);
                }
            }
        }
    }

    fn resolve_user_op(&mut self, id: u64, result: Result<Option<String>, TopologyError>) {
        if self.user_ops.take(id).is_some() {
            self.after_delete(id, result.is_ok());
            self.events.push_back(Event::TopologyResolved {
                op: OpId(id),
                result,
            });
        }
    }

    /// Request `id` resolved: the replay steps skipped for it (a delete or an
    /// unbind) are dropped if it succeeded, and run now on their channels if
    /// it failed (their subject is still there, and the channel must have it).
    fn after_delete(&mut self, id: u64, succeeded: bool) {
        if self.skipped_for_delete.is_empty() {
            return;
        }
        let (skipped, kept) = std::mem::take(&mut self.skipped_for_delete)
            .into_iter()
            .partition(|(delete, ..)| *delete == id);
        self.skipped_for_delete = kept;
        if succeeded {
            // a consumer whose subscription was skipped was never on the
            // broker, so no cancel of the broker's ends it: the delete does
            for (.., step) in skipped {
                if let Step::Consume(consumer) = step
                    && self
                        .registry
                        .consumers
                        .get(&consumer)
                        .is_some_and(|k| self.registry.queue_entity_id(&k.queue).is_none())
                {
                    self.end_with_its_queue(consumer);
                }
            }
            return;
        }
        let mut kicked = Vec::new();
        for (_, c, i, generation, step) in skipped {
            let ch = &mut self.conns[c].channels[i];
            if ch.generation == generation && ch.state.runs_steps() {
                ch.current.steps.push_back(step);
                if !kicked.contains(&(c, i)) {
                    kicked.push((c, i));
                }
            }
        }
        for (c, i) in kicked {
            self.kick(c, i);
        }
    }

    /// Ends consumer `id`, whose queue the application deleted, as the
    /// broker's cancel of it would.
    fn end_with_its_queue(&mut self, id: u64) {
        let Some(consumer) = self.registry.consumers.remove(&id) else {
            return;
        };
        self.registry.tags.remove(&consumer.tag);
        self.events.push_back(Event::ConsumerCancelled {
            consumer: ConsumerId(id),
            resubscribing: false,
        });
        self.events.push_back(Event::ConsumerEnded {
            consumer: ConsumerId(id),
            error: ConsumeError::CancelledByBroker,
        });
    }

    pub(super) fn expire_user_ops(&mut self) {
        while let Some(&(at, id)) = self.user_ops.deadlines.first() {
            if at > self.now {
                break;
            }
            let error = match &self.first_error {
                Some(e) if !self.ever_ready => TopologyError::Unreachable(e.clone()),
                _ => TopologyError::TimedOut,
            };
            self.resolve_user_op(id, Err(error));
        }
    }

    pub(super) fn user_ops_closed(&mut self) {
        let ids: Vec<u64> = self.user_ops.ops.keys().copied().collect();
        for id in ids {
            self.resolve_user_op(id, Err(TopologyError::Closed));
        }
    }

    // ----- consumers -----

    /// Starts a consumer on `queue`. It lives on one channel of the pool (on the
    /// queue's own connection for exclusive and server-named queues) and is
    /// re-subscribed, with the same tag, after every recovery. Deliveries arrive as
    /// [`Event::Delivery`].
    pub fn consume(
        &mut self,
        now: Instant,
        queue: QueueRef,
        consumer_tag: Option<String>,
        options: ConsumeOptions,
    ) -> Result<ConsumerId, ConsumeError> {
        self.advance(now);
        // a draining close takes nothing new either
        if self.is_closing() {
            return Err(ConsumeError::Closed);
        }
        if matches!(&queue, QueueRef::Named(name) if name.is_empty()) {
            return Err(ConsumeError::Invalid(EMPTY_QUEUE_NAME.into()));
        }
        let queue = self.registry.canonical(&queue);
        match &queue {
            QueueRef::Named(name) => {
                check_name("queue name", name).map_err(ConsumeError::Invalid)?;
            }
            QueueRef::Handle(h) => {
                if !self.registry.has_handle(*h) && !self.user_ops.declares(*h) {
                    return Err(ConsumeError::UnknownQueue(*h));
                }
            }
        }
        let id = self.registry.new_consumer_id();
        let tag = match consumer_tag {
            Some(tag) if tag.is_empty() => {
                return Err(ConsumeError::Invalid("empty consumer tag".into()));
            }
            Some(tag) => {
                check_name("consumer tag", &tag).map_err(ConsumeError::Invalid)?;
                tag
            }
            // one the application did not take already (it may name its own
            // consumers in the same pattern)
            None => {
                let mut tag = format!("rebound-{id}");
                let mut n = 0u32;
                while self.registry.tags.contains_key(&tag) {
                    n += 1;
                    tag = format!("rebound-{id}.{n}");
                }
                tag
            }
        };
        if self.registry.tags.contains_key(&tag) {
            return Err(ConsumeError::DuplicateTag(tag));
        }
        check_arguments(
            "consumer arguments",
            &options.arguments,
            queue_name_size(&queue) + short_strings(&[&tag]),
            self.frame_max,
        )
        .map_err(ConsumeError::Invalid)?;
        self.registry.tags.insert(tag.clone(), id);
        self.registry.consumers.insert(
            id,
            ConsumerEntry {
                tag,
                queue,
                options,
                conn: None,
                chan: None,
                subscribed: None,
                started: false,
                refusals: 0,
                exclusive_since: None,
                retry_at: None,
            },
        );
        let deadline = super::deadline_after(self.now, self.config.publish_timeout);
        self.consume_waits.insert((deadline, id));
        self.assign_consumers();
        Ok(ConsumerId(id))
    }

    /// Cancels a consumer; it is not re-subscribed again. Its deliveries not yet
    /// acked can still be acked on their channel generation.
    pub fn cancel(&mut self, now: Instant, consumer: ConsumerId) -> Result<(), ConsumeError> {
        self.advance(now);
        let Some(entry) = self.registry.consumers.remove(&consumer.0) else {
            return Ok(());
        };
        self.consume_waits.retain(|&(_, w)| w != consumer.0);
        self.registry.tags.remove(&entry.tag);
        // the broker deletes an auto-delete queue with its last consumer: once
        // it takes the cancel sent below, or now if none is sent
        let mut forget = entry.started.then(|| entry.queue.clone());
        if let (Some(c), Some(i)) = (entry.conn, entry.chan) {
            let ch = &mut self.conns[c].channels[i];
            // it may still sit in the replay queue, or wait to be tried again
            // (in exclusive use): then the broker does not know it here
            let before = ch.current.steps.len();
            ch.current
                .steps
                .retain(|s| !matches!(s, Step::Qos(id) | Step::Consume(id) if *id == consumer.0));
            let started = before == ch.current.steps.len() && entry.retry_at.is_none();
            if started && ch.state.runs_steps() {
                if self.cancelled.len() == CANCELLED_KEPT {
                    self.cancelled.pop_front();
                }
                let consumer = CancelledTag {
                    channel: chan_id(c, i),
                    generation: ch.generation,
                    tag: entry.tag.clone(),
                };
                if entry.options.no_ack {
                    self.holds.push(Hold {
                        consumer: consumer.clone(),
                        until: self.now + CANCEL_HOLD_MAX,
                    });
                }
                self.cancelled.push_back(Cancelled {
                    consumer,
                    no_ack: entry.options.no_ack,
                    queue: forget.take(),
                });
                let ch = &mut self.conns[c].channels[i];
                ch.current.steps.push_back(Step::Cancel(entry.tag));
                self.kick(c, i);
            } else if !ch.state.runs_steps()
                && entry.subscribed.is_some()
                && let Some(queue) = self.registry.queue_entity_id(&entry.queue)
            {
                // the broker had it and dropped it with the channel: its
                // auto-delete queue may be gone even if a consumer started
                // meanwhile (never subscribed) keeps it in the registry
                self.lost_with_channel.push((c, i, queue));
            }
        }
        if let Some(queue) = forget {
            self.registry.forget_auto_delete_queue(&queue);
        }
        Ok(())
    }

    /// Gives every consumer whose queue is known a channel, and starts it there
    /// if the channel is up.
    fn assign_consumers(&mut self) {
        let unassigned: Vec<u64> = self
            .registry
            .consumers
            .iter()
            .filter(|(_, k)| k.conn.is_none())
            .map(|(id, _)| *id)
            .collect();
        for id in unassigned {
            let queue = self.registry.consumers[&id].queue.clone();
            if self.registry.resolve(&queue).is_none_or(|n| n.is_empty()) {
                continue; // its declaration has not been accepted yet
            }
            let owner = self.registry.owner(&queue);
            let mut load =
                vec![vec![0usize; self.config.channels_per_connection]; self.conns.len()];
            for k in self.registry.consumers.values() {
                if let (Some(c), Some(i)) = (k.conn, k.chan) {
                    load[c][i] += 1;
                }
            }
            let mut best: Option<(usize, usize, usize)> = None;
            for (c, row) in load.iter().enumerate() {
                if owner.is_some_and(|o| o != c) {
                    continue;
                }
                for (i, &n) in row.iter().enumerate() {
                    if best.is_none_or(|(_, _, m)| n < m) {
                        best = Some((c, i, n));
                    }
                }
            }
            let Some((c, i, _)) = best else { continue };
            if let Some(k) = self.registry.consumers.get_mut(&id) {
                k.conn = Some(c);
                k.chan = Some(i);
            }
            let ch = &mut self.conns[c].channels[i];
            if ch.state.runs_steps() {
                ch.current.steps.push_back(Step::Qos(id));
                ch.current.steps.push_back(Step::Consume(id));
                self.kick(c, i);
            }
        }
    }

    pub(super) fn on_delivery(
        &mut self,
        channel: ChannelId,
        generation: u64,
        delivery: Box<Delivery>,
    ) {
        let Some((c, i)) = self.current_chan(channel, generation) else {
            return;
        };
        let tag = &delivery.consumer_tag;
        let cancelled = self
            .cancelled
            .iter()
            .rfind(|k| k.consumer.is(channel, generation, tag));
        // The consumer with this tag on this channel. A tag the application
        // gave again, after a cancel, names the new consumer only once the
        // broker accepted it: until then it is the cancelled one's.
        let consumer = self.registry.tags.get(tag).copied().filter(|id| {
            self.registry.consumers.get(id).is_some_and(|k| {
                k.conn == Some(c)
                    && k.chan == Some(i)
                    && (cancelled.is_none() || k.subscribed.is_some())
            })
        });
        let Some(id) = consumer else {
            // A consumer cancelled meanwhile. If it acks, the delivery goes back
            // to the queue now (else it would wait for the channel's close). A
            // tag not known here, or an auto-ack consumer's, is left alone: a
            // nack of it would close the channel (406).
            let requeue = cancelled.is_some_and(|k| !k.no_ack);
            tracing::debug!(
                target: targets::TOPOLOGY,
                consumer_tag = %delivery.consumer_tag,
                requeue,
                "delivery for a cancelled consumer"
            );
            if requeue {
                self.commands.push_back(Command::Ack {
                    channel,
                    generation,
                    delivery_tag: delivery.delivery_tag,
                    kind: AckKind::Nack {
                        multiple: false,
                        requeue: true,
                    },
                });
            }
            return;
        };
        let no_ack = self
            .registry
            .consumers
            .get(&id)
            .is_some_and(|k| k.options.no_ack);
        if !no_ack {
            self.conns[c].channels[i]
                .current
                .unacked
                .insert(delivery.delivery_tag);
        }
        self.stats.deliveries += 1;
        self.events.push_back(Event::Delivery {
            consumer: ConsumerId(id),
            channel,
            generation,
            delivery,
        });
    }

    /// Acks, nacks or rejects a delivery. Refused with [`AckError::Stale`] when the
    /// delivery's channel generation is gone (nothing is sent: the broker
    /// redelivers), and with [`AckError::UnknownTag`] for a tag that is not
    /// outstanding (sending it would make the broker close the channel).
    pub fn ack(
        &mut self,
        now: Instant,
        channel: ChannelId,
        generation: u64,
        delivery_tag: u64,
        kind: AckKind,
    ) -> Result<(), AckError> {
        self.advance(now);
        if self.closed {
            return Err(AckError::Closed);
        }
        let Some((c, i)) = self.current_chan(channel, generation) else {
            if self.chan(channel).is_some() {
                self.stats.stale_acks += 1;
                self.sync_metrics();
                return Err(AckError::Stale);
            }
            return Err(AckError::UnknownTag(delivery_tag));
        };
        let ch = &mut self.conns[c].channels[i];
        let live = ch.state.is_open();
        if !live {
            self.stats.stale_acks += 1;
            self.sync_metrics();
            return Err(AckError::Stale);
        }
        let multiple = match kind {
            AckKind::Ack { multiple } | AckKind::Nack { multiple, .. } => multiple,
            AckKind::Reject { .. } => false,
        };
        // RabbitMQ closes the channel (406) unless the tag itself is outstanding,
        // with `multiple` too.
        if !ch.current.unacked.contains(&delivery_tag) {
            return Err(AckError::UnknownTag(delivery_tag));
        }
        if multiple {
            let rest = ch.current.unacked.split_off(&(delivery_tag + 1));
            ch.current.unacked = rest;
        } else {
            ch.current.unacked.remove(&delivery_tag);
        }
        self.commands.push_back(Command::Ack {
            channel,
            generation,
            delivery_tag,
            kind,
        });
        Ok(())
    }

    /// The broker cancelled a consumer: re-declare its queue (and bindings) and
    /// re-subscribe if the queue is in the registry; otherwise the consumer ends.
    ///
    /// A deleted queue cancels all of its consumers at once: the queue is declared
    /// again once (a server-named one gets one new name), and every cancelled
    /// consumer re-subscribes to it when that declaration is back.
    pub(super) fn on_consumer_cancelled(&mut self, channel: ChannelId, generation: u64, tag: &str) {
        let Some((c, i)) = self.current_chan(channel, generation) else {
            return;
        };
        let Some(&id) = self.registry.tags.get(tag) else {
            return;
        };
        let consumer = &self.registry.consumers[&id];
        if consumer.conn != Some(c) || consumer.chan != Some(i) {
            return; // not where this consumer lives: not ours to act on
        }
        let queue = consumer.queue.clone();
        // A delete of this queue the application asked for is on its way: the
        // cancel is most likely its doing (it can come, on the consumer's
        // channel, before the delete's answer on another). Declaring the queue
        // again here would reach the broker after the delete and bring the
        // queue back: the consumer ends as it would after the delete's answer.
        let entity = self.registry.queue_entity_id(&queue);
        let Some(entity) = entity.filter(|&e| !self.deleted_in_flight(e)) else {
            self.end_with_its_queue(id);
            return;
        };
        self.events.push_back(Event::ConsumerCancelled {
            consumer: ConsumerId(id),
            resubscribing: true,
        });
        let current = self.registry.resolve(&queue);
        let subscribed = self.registry.consumers[&id].subscribed.clone();
        if let Some(waiting) = self.registry.redeclaring.get_mut(&entity) {
            // another consumer's cancel already started the re-declaration; this
            // one needs no cancel of its own any more
            waiting.retain(|(k, _)| *k != id);
            waiting.push((id, false));
        } else if subscribed.is_some() && subscribed != current {
            // the queue was re-declared since this consumer subscribed
            self.resubscribe(id, false);
        } else {
            // A server-named queue comes back under a new name: every consumer of
            // it moves there, not just the cancelled one (the others may still sit
            // on the old queue and would never see the new name's messages).
            let mut waiting = vec![(id, false)];
            if self.registry.is_server_named_queue(entity) {
                for (&other, k) in &self.registry.consumers {
                    if other != id && self.registry.queue_entity_id(&k.queue) == Some(entity) {
                        waiting.push((other, true));
                    }
                }
            }
            self.registry.redeclaring.insert(entity, waiting);
            let bindings = self.registry.bindings_of(entity);
            let ch = &mut self.conns[c].channels[i];
            ch.current.steps.push_back(Step::Entity(entity));
            ch.current
                .steps
                .extend(bindings.into_iter().map(Step::Entity));
            self.kick(c, i);
        }
    }

    /// Consumers waiting for the re-declaration of a queue the application has
    /// since deleted (the broker's cancel came before the delete's answer) end as
    /// if the cancel had come after it: `CancelledByBroker`, their queue no longer
    /// in the topology. The queued re-declaration finds nothing to declare.
    fn end_orphaned_redeclarations(&mut self) {
        let gone: Vec<u64> = self
            .registry
            .redeclaring
            .keys()
            .copied()
            .filter(|&entity| self.registry.replay_op(entity).is_none())
            .collect();
        for entity in gone {
            let waiting = self
                .registry
                .redeclaring
                .remove(&entity)
                .unwrap_or_default();
            for (id, _) in waiting {
                let Some(consumer) = self.registry.consumers.remove(&id) else {
                    continue;
                };
                self.registry.tags.remove(&consumer.tag);
                self.events.push_back(Event::ConsumerEnded {
                    consumer: ConsumerId(id),
                    error: ConsumeError::CancelledByBroker,
                });
            }
        }
    }

    /// A channel went down with queue re-declarations still queued on it: forget
    /// them (so a later cancel starts afresh) and re-subscribe the consumers that
    /// waited for them elsewhere; those on this channel come back with its replay.
    pub(super) fn redeclarations_dropped(&mut self, c: usize, i: usize, steps: &[Step]) {
        for step in steps {
            let Step::Entity(entity) = step else { continue };
            let Some(waiting) = self.registry.redeclaring.remove(entity) else {
                continue;
            };
            for (consumer, cancel_first) in waiting {
                let here = self
                    .registry
                    .consumers
                    .get(&consumer)
                    .is_some_and(|k| k.conn == Some(c) && k.chan == Some(i));
                if !here {
                    self.resubscribe(consumer, cancel_first);
                }
            }
        }
    }

    /// Subscribes a consumer again on its channel, if that channel is up (a
    /// channel that is not replays its consumers when it is); `cancel_first` ends
    /// its subscription to the queue's old name before.
    fn resubscribe(&mut self, consumer: u64, cancel_first: bool) {
        let Some(k) = self.registry.consumers.get_mut(&consumer) else {
            return;
        };
        // subscribed now: a retry it waited for (in exclusive use) is moot
        k.retry_at = None;
        let (Some(c), Some(i)) = (k.conn, k.chan) else {
            return;
        };
        let tag = k.tag.clone();
        let ch = &mut self.conns[c].channels[i];
        if ch.state.runs_steps() {
            if cancel_first {
                ch.current.steps.push_back(Step::Cancel(tag));
            }
            ch.current.steps.push_back(Step::Qos(consumer));
            ch.current.steps.push_back(Step::Consume(consumer));
            self.kick(c, i);
        }
    }

    /// The broker answered the cancel of consumer `tag` on channel (c, i):
    /// publishes held for it go out, and its auto-delete queue is gone if no
    /// consumer of it remains.
    fn cancel_answered(&mut self, c: usize, i: usize, tag: &str) {
        let (channel, generation) = (chan_id(c, i), self.conns[c].channels[i].generation);
        let queue = self
            .cancelled
            .iter_mut()
            .rfind(|k| k.consumer.is(channel, generation, tag))
            .and_then(|k| k.queue.take());
        if let Some(queue) = queue {
            self.registry.forget_auto_delete_queue(&queue);
        }
        let before = self.holds.len();
        self.holds
            .retain(|h| !h.consumer.is(channel, generation, tag));
        if self.holds.len() != before {
            self.pump();
        }
    }

    /// Whether publishes wait for the broker to take an auto-ack consumer's
    /// cancel; holds whose channel is gone, or whose bound has passed, end.
    pub(super) fn held(&mut self) -> bool {
        let (now, conns) = (self.now, &self.conns);
        self.holds.retain(|h| {
            h.until > now
                && conns
                    .get(usize::from(h.consumer.channel.connection.0))
                    .and_then(|conn| conn.channels.get(usize::from(h.consumer.channel.index)))
                    .is_some_and(|ch| {
                        ch.generation == h.consumer.generation && ch.state.runs_steps()
                    })
        });
        !self.holds.is_empty()
    }

    /// How long a consumer refused as "in exclusive use" is tried again:
    /// [`EXCLUSIVE_USE_GRACE`], or three of the longest heartbeat interval a
    /// host's URI asks for.
    fn exclusive_use_grace(&self) -> Duration {
        let longest = self.hosts.iter().filter_map(|h| h.heartbeat()).max();
        let heartbeats = Duration::from_secs(3 * u64::from(longest.unwrap_or(0)));
        EXCLUSIVE_USE_GRACE.max(heartbeats)
    }

    /// A consumer refused as "in exclusive use" is due to be tried again: on its
    /// channel now if that is up, else in the channel's next replay.
    pub(super) fn consumer_retry_due(&mut self, consumer: u64) {
        let Some(k) = self.registry.consumers.get_mut(&consumer) else {
            return; // cancelled meanwhile
        };
        if k.retry_at.take_if(|at| *at <= self.now).is_some() {
            self.resubscribe(consumer, false);
        }
    }

    /// The channel a consumer lives on, once assigned.
    pub fn consumer_channel(&self, consumer: ConsumerId) -> Option<ChannelId> {
        let k = self.registry.consumers.get(&consumer.0)?;
        Some(chan_id(k.conn?, k.chan?))
    }
}

/// Why `""` is refused as a queue name: in AMQP it names the queue declared
/// last on the channel, and the client chooses the channel.
const EMPTY_QUEUE_NAME: &str = "a queue name is required: \"\" names the queue declared last on \
     the channel, which the application does not choose (declare \"\" for a server-named queue \
     and use its handle)";

/// The encoded size of the queue's name in a method: a queue given by handle
/// may carry a name of up to 255 bytes.
fn queue_name_size(queue: &QueueRef) -> usize {
    match queue {
        QueueRef::Named(name) => 1 + name.len(),
        QueueRef::Handle(_) => 1 + SHORT_STRING_MAX,
    }
}

impl Supervisor {
    /// Whether the broker closed connection `c` with `error` for a command it
    /// refuses (see [`Supervisor::blame_the_command`]): 502, 503 or 540; or 501
    /// FRAME_ERROR while no publish awaits its confirm on the connection (a
    /// publish too large for the broker's frames draws it too).
    fn refused_command(&self, c: usize, error: &TransportError) -> bool {
        match error.reply_code() {
            Some(502 | 503 | 540) => true,
            Some(501) => self.conns[c]
                .channels
                .iter()
                .all(|ch| ch.current.in_flight.is_empty()),
            _ => false,
        }
    }
}
