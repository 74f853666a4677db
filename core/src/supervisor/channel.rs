//! The channel machines: open, replay, Ready, loss and reopen.
//!
//! Each state of [`ChannelState`] names what the channel waits for; what one
//! generation of the channel carries lives in one [`Generation`], replaced as a
//! whole by each open and handed, as a whole, to the loss handler
//! ([`Supervisor::channel_down`]), which gives the publishes back to the outbox and
//! the topology steps back to their owners.

use std::collections::{BTreeSet, VecDeque};
use std::time::Instant;

use super::publish::Culprit;
use super::topology::Step;
use super::{Command, SUSPECT_GRACE, Supervisor, deadline_after};
use crate::backoff::Backoff;
use crate::error::{ErrorClass, TransportError};
use crate::event::{Event, Reason};
use crate::ids::{ChannelId, ConnectionId, Object};
use crate::state::ChannelState;
use crate::telemetry::targets;

/// One channel slot.
pub(super) struct Chan {
    pub(super) state: ChannelState,
    /// The generation of the last open; results for older ones are stale.
    pub(super) generation: u64,
    /// The connection epoch of the current generation.
    pub(super) epoch: u64,
    /// The connection epoch of the previous generation: equal to `epoch` when
    /// only the channel was reopened (the connection lived on).
    pub(super) prev_epoch: u64,
    pub(super) ready_since: Option<Instant>,
    /// The reopen delays after the channel's own failures: made with the first
    /// one (most channels never fail alone, and a `Backoff` carries its whole
    /// configuration).
    pub(super) backoff: Option<Box<Backoff>>,
    pub(super) timer: Option<Instant>,
    /// What the current generation carries.
    pub(super) current: Generation,
}

impl Chan {
    pub(super) fn new() -> Self {
        Chan {
            state: ChannelState::Idle,
            generation: 0,
            epoch: 0,
            prev_epoch: 0,
            ready_since: None,
            backoff: None,
            timer: None,
            current: Generation::default(),
        }
    }
}

/// What one generation of a channel carries. Nothing in it outlives the
/// generation: the loss handler takes it whole.
#[derive(Default)]
pub(super) struct Generation {
    /// Publishes awaiting a confirm: `(seq, publish id)`, by seq.
    pub(super) in_flight: VecDeque<(u64, u64)>,
    /// Sequence number of the last publish.
    pub(super) next_seq: u64,
    /// Delivery tags not yet acked, nacked or rejected.
    pub(super) unacked: BTreeSet<u64>,
    /// Topology steps still to run (replay, then the application's requests).
    pub(super) steps: VecDeque<Step>,
    /// The step whose [`Command::Topology`] is in flight.
    pub(super) step_in_flight: Option<Step>,
    /// Steps answered since the replay started.
    pub(super) steps_done: u32,
    /// The `replay` span and its start, while a replay runs and DEBUG is on for
    /// the topology target.
    pub(super) replay: Option<(tracing::Span, Instant)>,
}

pub(super) fn chan_id(c: usize, i: usize) -> ChannelId {
    ChannelId {
        connection: ConnectionId(c as u16),
        index: i as u16,
    }
}

impl Supervisor {
    pub(super) fn chan(&self, id: ChannelId) -> Option<&Chan> {
        self.conns
            .get(usize::from(id.connection.0))?
            .channels
            .get(usize::from(id.index))
    }

    /// `(connection index, channel index)` if `generation` is the slot's current one.
    pub(super) fn current_chan(&self, id: ChannelId, generation: u64) -> Option<(usize, usize)> {
        (self.chan(id)?.generation == generation)
            .then_some((usize::from(id.connection.0), usize::from(id.index)))
    }

    /// Idle or Reopening -> AwaitingOpenOk, as a new generation on the connection's
    /// current epoch.
    pub(super) fn open_channel(&mut self, c: usize, i: usize, reason: Reason) {
        let epoch = self.conns[c].epoch;
        let ch = &mut self.conns[c].channels[i];
        if ch.state == ChannelState::Closed {
            return;
        }
        ch.generation += 1;
        ch.prev_epoch = std::mem::replace(&mut ch.epoch, epoch);
        ch.current = Generation::default();
        let generation = ch.generation;
        self.set_chan_timer(c, i, None);
        self.set_chan_state(c, i, ChannelState::AwaitingOpenOk, reason);
        self.commands.push_back(Command::OpenChannel {
            channel: chan_id(c, i),
            epoch,
            generation,
        });
    }

    /// AwaitingOpenOk -> AwaitingTopology or Replaying.
    pub(super) fn on_channel_opened(&mut self, id: ChannelId, generation: u64) {
        let Some((c, i)) = self.current_chan(id, generation) else {
            // An open we no longer wait for: do not leave it open on the broker.
            if self.chan(id).is_some_and(|ch| generation < ch.generation) {
                self.commands.push_back(Command::CloseChannel {
                    channel: id,
                    generation,
                });
            }
            return;
        };
        if self.conns[c].channels[i].state == ChannelState::AwaitingOpenOk {
            self.start_replay(c, i);
        }
    }

    /// The replay of channel (c, i) made progress: its state shows how far.
    pub(super) fn replay_progress(&mut self, c: usize, i: usize) {
        let ch = &mut self.conns[c].channels[i];
        if let ChannelState::Replaying { done, total } = &mut ch.state {
            let g = &ch.current;
            *done = g.steps_done;
            let left = g.steps.len() + usize::from(g.step_in_flight.is_some());
            *total = g
                .steps_done
                .saturating_add(u32::try_from(left).unwrap_or(u32::MAX));
        }
    }

    /// Replaying -> Ready: the channel is open and its topology replayed, it may
    /// be handed out.
    pub(super) fn channel_ready(&mut self, c: usize, i: usize) {
        if !self.ever_ready {
            self.ever_ready = true;
            self.first_error = None;
            self.events
                .push_back(Event::FirstContact { result: Ok(()) });
        }
        self.conns[c].channels[i].ready_since = Some(self.now);
        self.room = true;
        if let Some(lost) = self.conns[c].lost.take() {
            let stall = self.now.saturating_duration_since(lost.at);
            self.last_stall = Some(stall);
            self.metrics.stall(self.conns[c].host, stall);
            let stall_ms = stall.as_secs_f64() * 1e3;
            lost.span.record("outcome", "recovered");
            lost.span.record("stall_ms", stall_ms);
            lost.span.record("dials", lost.dials);
            lost.span.in_scope(|| {
                tracing::info!(
                    target: targets::CONNECTION,
                    client = self.name(),
                    connection = %ConnectionId(c as u16),
                    stall_ms,
                    "connection recovered"
                );
            });
        }
        self.set_chan_state(c, i, ChannelState::Ready, Reason::ChannelOpened);
    }

    /// The open failed or the open channel was lost.
    pub(super) fn on_channel_failed(
        &mut self,
        id: ChannelId,
        generation: u64,
        error: TransportError,
    ) {
        let Some((c, i)) = self.current_chan(id, generation) else {
            return;
        };
        if self.closed {
            // no reopen while closing: what it carried resolves as Closed
            self.channel_down(c, i, None);
            self.close_when_drained(c);
            return;
        }
        if !self.conns[c].channels[i].state.is_live() || !self.conns[c].state.is_ready() {
            // The connection's own loss (reported separately) reopens it.
            return;
        }
        if error.is_connection_level() {
            // The broker is closing the whole connection (lapin reports it on each
            // channel before the connection itself): handle it as the connection's
            // loss now, so what this channel carried is not re-sent on siblings
            // that die with it. The transport's own report comes for an old epoch.
            let epoch = self.conns[c].epoch;
            self.commands.push_back(Command::CloseConnection {
                connection: id.connection,
                epoch,
            });
            self.on_connection_lost(id.connection, epoch, error);
            return;
        }
        if error.reply_code().is_none() && self.conns[c].channels.len() > 1 {
            // No broker verdict (an I/O error, a stream that ended): over lapin
            // every channel reports this just before its connection's loss. Hold
            // this connection's other channels for a moment, so what this channel
            // carried is not sent on siblings about to die with it (and sent a
            // third time after the reconnect).
            let until = deadline_after(self.now, SUSPECT_GRACE);
            self.conns[c].suspect_until = Some(until);
            self.set_conn_timer(c, Some(until));
        }
        self.channel_failed(c, i, error);
    }

    /// A live channel of a Ready connection failed -> Reopening after its own
    /// backoff; what it carried goes back to the outbox.
    pub(super) fn channel_failed(&mut self, c: usize, i: usize, error: TransportError) {
        // The connection lives on, and so do the entities its channel 0 replayed:
        // the other channels keep going (topology_ready stays as it is).
        self.channel_down(c, i, Some(&error));
        self.commands.push_back(Command::CloseChannel {
            channel: chan_id(c, i),
            generation: self.conns[c].channels[i].generation,
        });
        let now = self.now;
        let config = &self.config.backoff;
        let ch = &mut self.conns[c].channels[i];
        let backoff = ch
            .backoff
            .get_or_insert_with(|| Box::new(Backoff::new(config.clone())));
        if ch
            .ready_since
            .is_some_and(|since| now.saturating_duration_since(since) >= config.reset_after)
        {
            backoff.reset();
        }
        ch.ready_since = None;
        let retry_at = deadline_after(now, backoff.next_delay(&mut self.rng));
        self.set_chan_timer(c, i, Some(retry_at));
        self.set_chan_state(
            c,
            i,
            ChannelState::Reopening {
                retry_at: Some(retry_at),
            },
            Reason::ChannelFailed(error.reply_code()),
        );
    }

    /// Its connection is down -> Reopening until the connection is Ready again.
    pub(super) fn channel_waits_for_connection(&mut self, c: usize, i: usize) {
        self.channel_down(c, i, None);
        if self.conns[c].channels[i].state != ChannelState::Closed {
            self.set_chan_timer(c, i, None);
            self.set_chan_state(
                c,
                i,
                ChannelState::Reopening { retry_at: None },
                Reason::ConnectionDown,
            );
        }
    }

    /// The channel's current generation is gone: it takes what the generation
    /// carried, as a unit. Publishes awaiting confirms go back to the outbox (or
    /// resolve, when closing or when they caused the error); topology steps go
    /// back to the requests they serve; unacked deliveries are forgotten (their
    /// tags mean nothing on another generation).
    pub(super) fn channel_down(&mut self, c: usize, i: usize, error: Option<&TransportError>) {
        let lost = std::mem::take(&mut self.conns[c].channels[i].current);
        if let Some((span, started)) = lost.replay {
            span.record(
                "outcome",
                if error.is_some() {
                    "failed"
                } else {
                    "interrupted"
                },
            );
            span.record(
                "duration_ms",
                self.now.saturating_duration_since(started).as_secs_f64() * 1e3,
            );
        }
        let ids: Vec<u64> = lost.in_flight.into_iter().map(|(_, id)| id).collect();
        // A refusal that names what about a message caused it (404 "no exchange
        // 'x'", 406 for its size or its user_id): the messages it names would
        // cause it again, so they fail at once, alone.
        let culprit = error.and_then(Culprit::of);
        let culprit_publish = culprit
            .as_ref()
            .is_some_and(|x| ids.iter().any(|&id| self.is_culprit(id, x)));
        // The broker's channel-level refusal of the step in flight (a 404 for a
        // queue whose node is down, say) can reach us as the channel's end before
        // the step's own failed reply, which then comes for a generation that is
        // gone: it is that step's failure (unless an in-flight publish explains
        // it), answered or reported as such.
        let mut steps: Vec<Step> = lost.steps.into();
        match (lost.step_in_flight, error) {
            // a reply the broker closes a channel with (not a connection's 320)
            (Some(step), Some(e))
                if e.reply_code().is_some()
                    && e.class() != ErrorClass::Transient
                    && !culprit_publish =>
            {
                self.step_failed(c, i, &step, e);
            }
            (Some(step), _) => steps.insert(0, step),
            (None, _) => {}
        }
        self.user_ops_back(&steps);
        self.redeclarations_dropped(c, i, &steps);
        self.publishes_lost(ids, error, culprit);
    }

    pub(super) fn set_chan_timer(&mut self, c: usize, i: usize, at: Option<Instant>) {
        let key = super::TimerKey::Channel(c as u16, i as u16);
        if let Some(old) = std::mem::replace(&mut self.conns[c].channels[i].timer, at) {
            self.timers.remove(&(old, key));
        }
        if let Some(at) = at {
            self.timers.insert((at, key));
        }
    }

    /// The one place a channel's state changes. Moves within one phase (the
    /// steps of an open, a reopening that gets or loses its retry time) are
    /// progress, not reported changes.
    pub(super) fn set_chan_state(&mut self, c: usize, i: usize, new: ChannelState, reason: Reason) {
        let old = self.conns[c].channels[i].state;
        if old == new {
            return;
        }
        self.conns[c].channels[i].state = new;
        let (from, to) = (old.phase(), new.phase());
        if from == to {
            return;
        }
        match (old.is_ready(), new.is_ready()) {
            (false, true) => self.ready_channels += 1,
            (true, false) => self.ready_channels -= 1,
            _ => {}
        }
        let object = Object::Channel(chan_id(c, i));
        self.metrics.channel_phase(from, to);
        tracing::debug!(target: targets::CHANNEL, %object, ?from, ?to, ?reason, "state changed");
        self.events.push_back(Event::StateChanged {
            object,
            from,
            to,
            reason,
        });
    }
}
