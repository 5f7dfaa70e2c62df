//! Raft messages that stay bad even from a member. The peer gate has proven who sent a
//! message; this checks that the message claims that sender, and that it is well formed
//! enough that handing it to openraft cannot wedge or crash the group: openraft trusts its
//! peers, and asserts (panics) on some inconsistencies, or stores a vote it can never get
//! past (a term of u64::MAX leaves no term to campaign in).

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{LogId, Vote};
use troupe_transport::{Refusal, VerifiedPeer};

use crate::types::{NodeId, TypeConfig};

/// A term further ahead of this node's own than any real run of elections can get.
pub const MAX_TERM_LEAP: u64 = 1 << 32;

/// Why a message is refused, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub refusal: Refusal,
    pub reason: String,
}

fn refused(refusal: Refusal, reason: String) -> Refused {
    Refused { refusal, reason }
}

/// A message that does not decode into a Raft message: a field missing, an unknown state.
pub fn malformed(error: super::wire::Malformed) -> Refused {
    refused(Refusal::BadMessage, error.to_string())
}

/// The sender a message claims must be the node its certificate proves.
fn check_sender(peer: Option<VerifiedPeer>, what: &str, claimed: NodeId) -> Result<(), Refused> {
    match peer {
        Some(VerifiedPeer::Insecure) => Ok(()),
        Some(VerifiedPeer::Node(proven)) if proven == claimed => Ok(()),
        Some(VerifiedPeer::Node(proven)) => Err(refused(
            Refusal::WrongSender,
            format!("a {what} from node {proven} claims to come from node {claimed}"),
        )),
        // Only a server without the peer gate gets here: refuse rather than trust.
        None => Err(refused(
            Refusal::NoCertificate,
            format!("a {what} arrived without a verified sender (the peer port must be served behind the peer gate)"),
        )),
    }
}

fn check_vote(vote: &Vote<NodeId>, own_term: u64, what: &str) -> Result<(), Refused> {
    let term = vote.leader_id.term;
    if term > own_term.saturating_add(MAX_TERM_LEAP) {
        return Err(refused(
            Refusal::BadMessage,
            format!("a {what} at term {term} is more than 2^32 terms ahead of this node's term {own_term}"),
        ));
    }
    Ok(())
}

fn check_log_id(
    log_id: &Option<LogId<NodeId>>,
    vote_term: u64,
    what: &str,
    field: &str,
) -> Result<(), Refused> {
    match log_id {
        Some(log_id) if log_id.leader_id.term > vote_term => Err(refused(
            Refusal::BadMessage,
            format!(
                "a {what} has {field} at term {} ahead of its own term {vote_term}",
                log_id.leader_id.term
            ),
        )),
        _ => Ok(()),
    }
}

pub fn vote(
    rpc: &VoteRequest<NodeId>,
    peer: Option<VerifiedPeer>,
    own_term: u64,
) -> Result<(), Refused> {
    check_sender(peer, "vote request", rpc.vote.leader_id.node_id)?;
    check_vote(&rpc.vote, own_term, "vote request")?;
    check_log_id(
        &rpc.last_log_id,
        rpc.vote.leader_id.term,
        "vote request",
        "its last log id",
    )
}

pub fn pre_vote(
    request: &troupe_proto::v1::PreVoteRequest,
    peer: Option<VerifiedPeer>,
) -> Result<(), Refused> {
    check_sender(peer, "pre-vote request", request.candidate)
}

pub fn append_entries(
    rpc: &AppendEntriesRequest<TypeConfig>,
    peer: Option<VerifiedPeer>,
    own_term: u64,
) -> Result<(), Refused> {
    const WHAT: &str = "append-entries request";
    check_sender(peer, WHAT, rpc.vote.leader_id.node_id)?;
    check_vote(&rpc.vote, own_term, WHAT)?;
    let term = rpc.vote.leader_id.term;
    check_log_id(&rpc.prev_log_id, term, WHAT, "its previous log id")?;
    check_log_id(&rpc.leader_commit, term, WHAT, "its commit")?;
    // Entries follow the previous log id one index at a time, in non-decreasing terms no later
    // than the leader's.
    let mut previous = rpc.prev_log_id;
    for entry in &rpc.entries {
        let id = entry.log_id;
        let expected_index = previous.map_or(0, |p| p.index.saturating_add(1));
        if id.index != expected_index {
            return Err(refused(
                Refusal::BadMessage,
                format!(
                    "a {WHAT} carries entry index {} where {expected_index} must come next",
                    id.index
                ),
            ));
        }
        if id.leader_id.term > term
            || previous.is_some_and(|p| p.leader_id.term > id.leader_id.term)
        {
            return Err(refused(
                Refusal::BadMessage,
                format!("a {WHAT} carries entry {} at term {}, out of order with its neighbours or its leader's term {term}", id.index, id.leader_id.term),
            ));
        }
        previous = Some(id);
    }
    Ok(())
}

pub fn install_snapshot(
    rpc: &InstallSnapshotRequest<TypeConfig>,
    peer: Option<VerifiedPeer>,
    own_term: u64,
) -> Result<(), Refused> {
    const WHAT: &str = "install-snapshot request";
    check_sender(peer, WHAT, rpc.vote.leader_id.node_id)?;
    check_vote(&rpc.vote, own_term, WHAT)?;
    check_log_id(
        &rpc.meta.last_log_id,
        rpc.vote.leader_id.term,
        WHAT,
        "its last log id",
    )
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Entry, EntryPayload};

    use super::*;

    fn log_id(term: u64, index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn append(
        term: u64,
        prev: Option<(u64, u64)>,
        entries: &[(u64, u64)],
    ) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(term, 1),
            prev_log_id: prev.map(|(t, i)| log_id(t, i)),
            entries: entries
                .iter()
                .map(|(t, i)| Entry {
                    log_id: log_id(*t, *i),
                    payload: EntryPayload::Blank,
                })
                .collect(),
            leader_commit: None,
        }
    }

    const LEADER: Option<VerifiedPeer> = Some(VerifiedPeer::Node(1));

    fn refusal(result: Result<(), Refused>) -> Option<Refusal> {
        result.err().map(|r| r.refusal)
    }

    #[test]
    fn well_formed_appends_pass_and_malformed_ones_are_refused() {
        assert_eq!(
            refusal(append_entries(
                &append(3, Some((2, 4)), &[(2, 5), (3, 6)]),
                LEADER,
                3
            )),
            None
        );
        assert_eq!(
            refusal(append_entries(
                &append(3, None, &[(1, 0), (1, 1)]),
                LEADER,
                3
            )),
            None
        );
        // A gap, a repeat, terms going backwards, an entry from a later term, a previous log id
        // from a later term.
        for bad in [
            append(3, Some((2, 4)), &[(2, 6)]),
            append(3, Some((2, 4)), &[(2, 5), (2, 5)]),
            append(3, Some((2, 4)), &[(3, 5), (2, 6)]),
            append(3, Some((2, 4)), &[(4, 5)]),
            append(3, Some((4, 4)), &[]),
            append(3, Some((2, u64::MAX)), &[(2, 0)]),
        ] {
            assert_eq!(
                refusal(append_entries(&bad, LEADER, 3)),
                Some(Refusal::BadMessage),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_sender_must_be_the_proven_node_and_terms_stay_near() {
        let rpc = append(3, None, &[]);
        assert_eq!(
            refusal(append_entries(&rpc, Some(VerifiedPeer::Node(2)), 3)),
            Some(Refusal::WrongSender)
        );
        assert_eq!(
            refusal(append_entries(&rpc, None, 3)),
            Some(Refusal::NoCertificate)
        );
        assert_eq!(
            refusal(append_entries(&rpc, Some(VerifiedPeer::Insecure), 3)),
            None
        );
        let vote = |term: u64, candidate: u64| VoteRequest {
            vote: Vote::new(term, candidate),
            last_log_id: Some(log_id(2, 9)),
        };
        assert_eq!(refusal(super::vote(&vote(4, 1), LEADER, 3)), None);
        assert_eq!(
            refusal(super::vote(&vote(3 + MAX_TERM_LEAP, 1), LEADER, 3)),
            None
        );
        assert_eq!(
            refusal(super::vote(&vote(4 + MAX_TERM_LEAP, 1), LEADER, 3)),
            Some(Refusal::BadMessage)
        );
        assert_eq!(
            refusal(super::vote(&vote(u64::MAX, 1), LEADER, u64::MAX - 1)),
            None
        );
        assert_eq!(
            refusal(super::vote(&vote(u64::MAX, 1), LEADER, 0)),
            Some(Refusal::BadMessage)
        );
        assert_eq!(
            refusal(super::vote(&vote(1, 1), LEADER, 3)),
            Some(Refusal::BadMessage),
            "its last log id is at term 2"
        );
        assert_eq!(
            refusal(super::vote(&vote(4, 2), LEADER, 3)),
            Some(Refusal::WrongSender)
        );
    }

    /// A pre-vote is asked by the node its certificate proves, or refused before it is
    /// answered: a peer cannot make a leaderless cluster believe another node wants to stand.
    #[test]
    fn a_pre_vote_must_come_from_its_candidate() {
        let request = troupe_proto::v1::PreVoteRequest {
            candidate: 1,
            term: u64::MAX,
            last_log: None,
        };
        assert_eq!(
            refusal(pre_vote(&request, Some(VerifiedPeer::Node(1)))),
            None
        );
        assert_eq!(
            refusal(pre_vote(&request, Some(VerifiedPeer::Node(2)))),
            Some(Refusal::WrongSender)
        );
        assert_eq!(
            refusal(pre_vote(&request, None)),
            Some(Refusal::NoCertificate)
        );
    }
}
