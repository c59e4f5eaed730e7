//! The splitter's control-plane view of its teams: where a joining peer goes, which shard owns
//! each team, and who is in it (for the peer list of the join message).
//!
//! A new peer joins the team with the most free room, or a new team when every team is full
//! (spec: "Many teams in one splitter"). Monitors are placed first in teams that lack one. Each team
//! lives on one shard; a new team goes to the shard with the fewest peers.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::Endpoint;
use super::team::TeamId;

/// Placement limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectoryRules {
    /// Most peers in a team (monitors included).
    pub team_size: usize,
    /// Monitors per team.
    pub monitors: usize,
    /// Number of shards teams are spread over.
    pub shards: usize,
}

/// Where a joining peer was placed, and what its join message must list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Its team.
    pub team: TeamId,
    /// The shard that owns the team.
    pub shard: usize,
    /// Whether it counts as one of the team's monitors.
    pub monitor: bool,
    /// The team's other members, monitors first: the peer says hello to each.
    pub peers: Vec<Endpoint>,
    /// How many entries of `peers` are monitors.
    pub monitors: u16,
}

#[derive(Debug, Clone)]
struct Entry {
    shard: usize,
    /// Members in round-robin order, monitors first; `true` marks a monitor.
    members: Vec<(Endpoint, bool)>,
}

impl Entry {
    fn monitors(&self) -> usize {
        self.members.iter().take_while(|m| m.1).count()
    }
}

/// Team membership as the control plane knows it.
#[derive(Debug)]
pub struct Directory {
    rules: DirectoryRules,
    teams: BTreeMap<TeamId, Entry>,
    /// Teams with room, by (members, id): the roomiest, oldest first. A join takes the first
    /// instead of scanning every team (100,000 teams of one at team size 1).
    with_room: BTreeSet<(usize, TeamId)>,
    /// Of those, the teams that lack a monitor.
    lacking_monitor: BTreeSet<(usize, TeamId)>,
    members: HashMap<Endpoint, TeamId>,
    shard_peers: Vec<usize>,
    next_id: TeamId,
}

impl Directory {
    /// An empty directory. `rules.team_size` and `rules.shards` must be at least 1.
    pub fn new(rules: DirectoryRules) -> Directory {
        assert!(
            rules.team_size >= 1 && rules.shards >= 1,
            "checked by the configuration"
        );
        Directory {
            rules,
            teams: BTreeMap::new(),
            with_room: BTreeSet::new(),
            lacking_monitor: BTreeSet::new(),
            members: HashMap::new(),
            shard_peers: vec![0; rules.shards],
            next_id: 0,
        }
    }

    /// Places `peer` (which asked to be a monitor if `wants_monitor`) in a team.
    pub fn place(&mut self, peer: Endpoint, wants_monitor: bool) -> Placement {
        self.remove(peer);
        let quota = self.rules.monitors;
        // Most free room first, then the oldest team.
        let roomiest = self.with_room.first().map(|&(_, id)| id);
        let (team, monitor) = if wants_monitor {
            // A monitor goes where a monitor is missing, else it starts a team of its own.
            match self.lacking_monitor.first().map(|&(_, id)| id) {
                Some(id) => (id, true),
                None if quota > 0 => (self.new_team(), true),
                None => (roomiest.unwrap_or_else(|| self.new_team()), false),
            }
        } else {
            (roomiest.unwrap_or_else(|| self.new_team()), false)
        };
        self.unindex(team);
        let entry = self.teams.get_mut(&team).expect("team chosen above exists");
        let peers: Vec<Endpoint> = entry.members.iter().map(|m| m.0).collect();
        let monitors = u16::try_from(entry.monitors()).unwrap_or(u16::MAX);
        let at = if monitor {
            entry.monitors()
        } else {
            entry.members.len()
        };
        entry.members.insert(at, (peer, monitor));
        let shard = entry.shard;
        self.shard_peers[shard] += 1;
        self.members.insert(peer, team);
        self.index(team);
        Placement {
            team,
            shard,
            monitor,
            peers,
            monitors,
        }
    }

    /// Takes `team` out of the room indexes (before its members change).
    fn unindex(&mut self, team: TeamId) {
        if let Some(e) = self.teams.get(&team) {
            self.with_room.remove(&(e.members.len(), team));
            self.lacking_monitor.remove(&(e.members.len(), team));
        }
    }

    /// Puts `team` back in the room indexes it belongs to (after its members changed).
    fn index(&mut self, team: TeamId) {
        if let Some(e) = self.teams.get(&team)
            && e.members.len() < self.rules.team_size
        {
            self.with_room.insert((e.members.len(), team));
            if e.monitors() < self.rules.monitors {
                self.lacking_monitor.insert((e.members.len(), team));
            }
        }
    }

    fn new_team(&mut self) -> TeamId {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let shard = (0..self.rules.shards)
            .min_by_key(|&s| (self.shard_peers[s], s))
            .expect("at least one shard");
        self.teams.insert(
            id,
            Entry {
                shard,
                members: Vec::new(),
            },
        );
        self.index(id);
        id
    }

    /// Forgets `peer`; returns its team and shard if it was a member. Empty teams are dropped.
    pub fn remove(&mut self, peer: Endpoint) -> Option<(TeamId, usize)> {
        let team = self.members.remove(&peer)?;
        self.unindex(team);
        let entry = self
            .teams
            .get_mut(&team)
            .expect("member index points at a team");
        entry.members.retain(|m| m.0 != peer);
        let shard = entry.shard;
        self.shard_peers[shard] -= 1;
        if entry.members.is_empty() {
            self.teams.remove(&team);
        } else {
            self.index(team);
        }
        Some((team, shard))
    }

    /// `old` is now known as `new` (NTS: a peer joins from its TCP endpoint and becomes a member
    /// at the UDP endpoint its NAT gave it towards the splitter), keeping its place. False when
    /// `old` is no member or `new` is taken.
    pub fn rename(&mut self, old: Endpoint, new: Endpoint) -> bool {
        if old == new {
            return self.members.contains_key(&old);
        }
        if self.members.contains_key(&new) {
            return false;
        }
        let Some(team) = self.members.remove(&old) else {
            return false;
        };
        self.members.insert(new, team);
        if let Some(entry) = self.teams.get_mut(&team) {
            for m in &mut entry.members {
                if m.0 == old {
                    m.0 = new;
                }
            }
        }
        true
    }

    /// The team and shard of `peer`.
    pub fn lookup(&self, peer: Endpoint) -> Option<(TeamId, usize)> {
        let team = *self.members.get(&peer)?;
        Some((team, self.teams[&team].shard))
    }

    /// Number of peers.
    pub fn peer_count(&self) -> usize {
        self.members.len()
    }

    /// Number of teams.
    pub fn team_count(&self) -> usize {
        self.teams.len()
    }

    /// Every team with its shard and members (monitor flag), for status pages.
    pub fn teams(&self) -> impl Iterator<Item = (TeamId, usize, &[(Endpoint, bool)])> {
        self.teams
            .iter()
            .map(|(id, e)| (*id, e.shard, e.members.as_slice()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: u16) -> Endpoint {
        Endpoint::new([127, 0, 0, 1].into(), port)
    }

    fn dir(team_size: usize, shards: usize) -> Directory {
        Directory::new(DirectoryRules {
            team_size,
            monitors: 1,
            shards,
        })
    }

    #[test]
    fn teams_fill_up_to_the_team_size() {
        let mut d = dir(4, 2);
        let m = d.place(ep(1), true);
        assert_eq!((m.team, m.shard, m.monitor, m.monitors), (0, 0, true, 0));
        assert!(m.peers.is_empty());
        let p = d.place(ep(2), false);
        assert_eq!((p.team, p.monitor, p.monitors), (0, false, 1));
        assert_eq!(p.peers, [ep(1)]);
        d.place(ep(3), false);
        d.place(ep(4), false);
        let p = d.place(ep(5), false);
        assert_eq!((p.team, p.shard), (1, 1), "a new team on the emptier shard");
        assert!(p.peers.is_empty());
        assert_eq!(d.team_count(), 2);
        assert_eq!(d.peer_count(), 5);
    }

    #[test]
    fn the_roomiest_team_is_refilled_first() {
        let mut d = dir(3, 1);
        for p in 1..=6 {
            d.place(ep(p), false);
        }
        d.remove(ep(1));
        d.remove(ep(2));
        d.remove(ep(4));
        assert_eq!(d.place(ep(7), false).team, 0);
        assert_eq!(d.place(ep(8), false).team, 0);
        assert_eq!(d.place(ep(9), false).team, 1);
    }

    #[test]
    fn a_monitor_goes_in_front_where_one_is_missing_or_starts_a_team() {
        let mut d = dir(4, 1);
        d.place(ep(2), false);
        let m = d.place(ep(1), true);
        assert_eq!((m.team, m.monitor, m.monitors), (0, true, 0));
        let p = d.place(ep(3), false);
        assert_eq!((p.peers.clone(), p.monitors), (vec![ep(1), ep(2)], 1));
        let m2 = d.place(ep(4), true);
        assert_eq!(
            (m2.team, m2.monitor),
            (1, true),
            "team 0 already has its monitor"
        );
    }

    #[test]
    fn joining_twice_moves_the_peer() {
        let mut d = dir(4, 1);
        d.place(ep(1), false);
        d.place(ep(1), false);
        assert_eq!(d.peer_count(), 1);
        assert_eq!(
            d.lookup(ep(1)),
            Some((1, 0)),
            "its old team emptied and was dropped"
        );
        assert_eq!(d.remove(ep(1)), Some((1, 0)));
        assert_eq!(d.team_count(), 0);
        assert_eq!(d.remove(ep(1)), None);
    }

    #[test]
    fn the_room_indexes_agree_with_a_scan_through_joins_and_leaves() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut random = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut d = Directory::new(DirectoryRules {
            team_size: 4,
            monitors: 1,
            shards: 3,
        });
        for _ in 0..20_000 {
            let peer = ep(1 + (random() % 200) as u16);
            if random() % 3 == 0 {
                d.remove(peer);
            } else {
                d.place(peer, random() % 5 == 0);
            }
            let scan: BTreeSet<(usize, TeamId)> = d
                .teams
                .iter()
                .filter(|(_, e)| e.members.len() < 4)
                .map(|(id, e)| (e.members.len(), *id))
                .collect();
            assert_eq!(d.with_room, scan);
            let lacking: BTreeSet<(usize, TeamId)> = d
                .teams
                .iter()
                .filter(|(_, e)| e.members.len() < 4 && e.monitors() < 1)
                .map(|(id, e)| (e.members.len(), *id))
                .collect();
            assert_eq!(d.lacking_monitor, lacking);
        }
    }
}
