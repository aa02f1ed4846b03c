//! Liveness of the selected path: keepalives while idle, probes when silent.
//!
//! - Anything authenticated from the selected remote (a check, a response, or caller
//!   reported QUIC traffic) counts as "received".
//! - Idle for `keepalive_interval` (neither received nor keepalive sent) → one keepalive.
//! - Nothing received for `liveness_timeout` → up to `liveness_probes` probes spaced by
//!   the doubling `rto_initial`; still nothing one timeout after the last → path lost.

use std::time::Instant;

use crate::config::Config;
use crate::pair::Retransmit;

/// What the agent must do after a liveness timer fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Nothing,
    SendKeepalive,
    SendProbe,
    Lost,
}

#[derive(Debug, Clone)]
pub(crate) struct Liveness {
    last_received: Instant,
    last_keepalive: Instant,
    probe: Option<Retransmit>,
}

impl Liveness {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            last_received: now,
            last_keepalive: now,
            probe: None,
        }
    }

    pub(crate) fn on_receive(&mut self, now: Instant) {
        self.last_received = self.last_received.max(now);
        self.probe = None;
    }

    pub(crate) fn poll_timeout(&self, config: &Config) -> Instant {
        match self.probe {
            Some(probe) => probe.next_at,
            None => {
                let idle_since = self.last_received.max(self.last_keepalive);
                (self.last_received + config.liveness_timeout).min(idle_since + config.keepalive_interval)
            }
        }
    }

    pub(crate) fn handle_timeout(&mut self, config: &Config, now: Instant) -> Action {
        if let Some(probe) = &mut self.probe {
            if now < probe.next_at {
                return Action::Nothing;
            }
            if probe.attempts >= config.liveness_probes {
                return Action::Lost;
            }
            probe.again(config, now);
            return Action::SendProbe;
        }
        if now >= self.last_received + config.liveness_timeout {
            self.probe = Some(Retransmit::first(config, now));
            return Action::SendProbe;
        }
        if now >= self.last_received.max(self.last_keepalive) + config.keepalive_interval {
            self.last_keepalive = now;
            return Action::SendKeepalive;
        }
        Action::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn config() -> Config {
        Config {
            keepalive_interval: Duration::from_secs(1),
            liveness_timeout: Duration::from_secs(3),
            ..Config::default()
        }
    }

    #[test]
    fn idle_path_gets_keepalives_and_silent_path_is_lost_after_probes() {
        let (config, t0) = (config(), crate::test_origin());
        let mut liveness = Liveness::new(t0);
        let mut now = t0;
        let mut actions = Vec::new();
        while actions.last() != Some(&Action::Lost) {
            now = liveness.poll_timeout(&config);
            actions.push(liveness.handle_timeout(&config, now));
        }
        use Action::*;
        let expected = [SendKeepalive, SendKeepalive, SendProbe, SendProbe, SendProbe, Lost];
        assert_eq!(actions, expected);
        assert_eq!(now - t0, Duration::from_millis(3700));
    }

    #[test]
    fn traffic_postpones_keepalive_and_cancels_probes() {
        let (config, t0) = (config(), crate::test_origin());
        let mut liveness = Liveness::new(t0);
        liveness.on_receive(t0 + Duration::from_millis(900));
        assert_eq!(liveness.poll_timeout(&config), t0 + Duration::from_millis(1900));
        let probe_at = t0 + Duration::from_millis(3900);
        assert_eq!(liveness.handle_timeout(&config, probe_at), Action::SendProbe);
        liveness.on_receive(probe_at);
        assert_eq!(liveness.poll_timeout(&config), probe_at + config.keepalive_interval);
    }
}
