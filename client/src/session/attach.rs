//! Attaching to a session's region: present the token, wait for the daemon's verdict, and
//! read the session's shape from the region header.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::after_wake::AfterWake;
use super::{closed_error, SessionHandle};
use kvdex_wire::proto;
use kvdex_wire::shm::layout::attach_state;
use kvdex_wire::shm::wait::{self, PidWatch, WaitPolicy};
use kvdex_wire::shm::{ConsumerState, ProducerState, Region};
use kvdex_wire::Shape;
use kvdex_wire::{Error, Result};

/// How long [`SessionHandle`] waits for the daemon to judge its token.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);

impl SessionHandle {
    /// Maps the region at `shm_path`, presents `token`, and waits for the daemon to accept it.
    pub fn attach(shm_path: &std::path::Path, token: &[u8; 16], wait: WaitPolicy) -> Result<Self> {
        let region = Region::open(shm_path)?;
        let h = region.header();
        let daemon = PidWatch::open(h.daemon_pid.load(Ordering::Relaxed)).ok();
        let a = &h.attach.0;
        for (i, w) in a.token.iter().enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(&token[i * 8..i * 8 + 8]);
            w.store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
        a.client_pid
            .store(std::process::id() as u64, Ordering::Relaxed);
        a.state.store(attach_state::REQUESTED, Ordering::Release);
        wait::force_wake(&h.daemon_sleeping.0);
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        let verdict = loop {
            let s = a.state.load(Ordering::Acquire);
            if s == attach_state::ACCEPTED || s == attach_state::REJECTED {
                break s;
            }
            if let Some(r) = region.closed() {
                return Err(closed_error(r));
            }
            if daemon.as_ref().is_some_and(|d| d.exited()) {
                return Err(Error::Disconnected("the daemon exited".into()));
            }
            if Instant::now() > deadline {
                return Err(Error::Disconnected(format!(
                    "no attach verdict from the daemon in {ATTACH_TIMEOUT:?}"
                )));
            }
            let policy = WaitPolicy {
                spin: Duration::ZERO,
                park_timeout: Duration::from_millis(20),
                ..Default::default()
            };
            wait::wait_until(&h.client_sleeping.0, policy, || {
                matches!(
                    a.state.load(Ordering::Acquire),
                    attach_state::ACCEPTED | attach_state::REJECTED
                )
            });
        };
        if verdict != attach_state::ACCEPTED {
            return Err(Error::Unauthorized(format!(
                "the daemon refused the token for {}",
                shm_path.display()
            )));
        }
        let f: Vec<u64> = h.shape.iter().map(|w| w.load(Ordering::Relaxed)).collect();
        let dtype = proto::dtype_from_code(f[4])
            .ok_or_else(|| Error::Protocol(format!("region has unknown dtype code {}", f[4])))?;
        let narrow = |v: u64| {
            u32::try_from(v)
                .map_err(|_| Error::Protocol(format!("region shape value {v} too large")))
        };
        let shape = Shape {
            layers: narrow(f[0])?,
            q_heads: narrow(f[1])?,
            kv_heads: narrow(f[2])?,
            head_dim: narrow(f[3])?,
            dtype,
        };
        shape.validate()?;
        let (sq, cq) = (
            ProducerState::new(&region.sq()),
            ConsumerState::new(&region.cq()),
        );
        Ok(Self {
            region,
            sq,
            cq,
            next_id: 1,
            wait,
            shape,
            daemon,
            after_wake: AfterWake::default(),
            http: None,
            interrupt: None,
            abandoned: false,
            slots: Default::default(),
        })
    }
}
