//! The `cluster` field of the VM spec (docs/interfaces.md): the nodes, this
//! node's keys, the transport and the DSM tuning, and their validation.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::dsm::auth::{self, NodeKeys};
use crate::dsm::engine::TransportKind;
use crate::dsm::protocol::NodeId;
use crate::dsm::seal::Protection;
use crate::numa::NumaNode;

/// What is wrong with the spec's `cluster` field (each message names the field).
#[derive(Debug, thiserror::Error)]
pub enum ClusterSpecError {
    #[error("cluster.nodes: empty list")]
    NoNodes,
    #[error("cluster.nodes: {0} nodes, at most {max} are supported", max = crate::dsm::protocol::MAX_NODES)]
    TooManyNodes(usize),
    #[error("cluster.node_index = {index}: must be below the number of nodes ({nodes})")]
    NodeIndex { index: usize, nodes: usize },
    #[error("cluster.node_index = {0}: too large")]
    NodeIndexTooLarge(usize),
    #[error("cluster.boot_node = {index}: must be below the number of nodes ({nodes})")]
    BootNode { index: usize, nodes: usize },
    #[error("numa: a cluster of {0} nodes needs a numa list with one entry per node")]
    NoNuma(usize),
    #[error("numa: {numa} entries but cluster.nodes has {nodes} (one NUMA node per cluster node)")]
    NumaCount { numa: usize, nodes: usize },
    #[error("cluster.boot_node = {0}: the BSP (vCPU 0) must be in numa[{0}].cpus")]
    BspNotOnBootNode(usize),
    #[error("cluster.placement: {0}")]
    Placement(String),
    #[error("cluster.nodes[{index}].addr = {addr:?}: not an ip:port address ({source})")]
    Addr {
        index: usize,
        addr: String,
        source: std::net::AddrParseError,
    },
    #[error("cluster.nodes[{index}].addr = {addr}: used by another node")]
    AddrTwice { index: usize, addr: SocketAddr },
    #[error("cluster.transport = {0:?}: must be \"tcp\" or \"shm\"")]
    Transport(String),
    #[error("cluster.connect_timeout_s = {0}: must be > 0")]
    ConnectTimeout(f64),
    #[error("cluster.node_pubkeys_hex: {keys} keys for {nodes} nodes (one per node)")]
    PubkeyCount { keys: usize, nodes: usize },
    #[error("{field}: not a hex string")]
    NotHex {
        field: String,
        source: hex::FromHexError,
    },
    #[error("{field}: {got} bytes, {want} are required")]
    HexLength {
        field: String,
        got: usize,
        want: usize,
    },
    #[error("cluster.private_key_hex: missing (the worker reads it from its standard input)")]
    NoPrivateKey,
    #[error("cluster.security = {0:?}: must be \"encrypt\", \"integrity\" or \"none\"")]
    Security(String),
    #[error("cluster.private_key_hex: {0}")]
    Keys(#[source] crate::dsm::auth::AuthError),
}

/// One node of the cluster in the spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterNodeSpec {
    /// `ip:port` of the node's DSM endpoint.
    pub addr: String,
}

/// The `cluster` field of the VM spec (docs/interfaces.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// This worker's node (index into `nodes` and `numa`).
    pub node_index: usize,
    pub nodes: Vec<ClusterNodeSpec>,
    /// Data-plane protection: "encrypt" (default), "integrity" or "none".
    #[serde(default)]
    pub security: Option<String>,
    /// The VM's session id (16 bytes, hex; public, the same on every node).
    pub session_hex: String,
    /// Every node's X25519 public key for this VM (hex), in `nodes` order.
    pub node_pubkeys_hex: Vec<String>,
    /// This node's X25519 private key (hex). Never in a spec file: the worker
    /// reads it from its standard input; never serialized, never printed.
    #[serde(default, skip_serializing)]
    pub private_key_hex: PrivateKeyHex,
    /// The node that runs the BSP and owns the devices.
    #[serde(default)]
    pub boot_node: usize,
    /// Memory aggregation: keep at most this many pages of other nodes' ranges
    /// resident (dvmm extension; absent: [`DEFAULT_FOREIGN_BUDGET_PERCENT`] of
    /// this node's own share).
    #[serde(default)]
    pub foreign_budget_pages: Option<usize>,
    /// DSM hold window in microseconds (0: off; absent: the engine's default,
    /// see [`crate::dsm::engine::DEFAULT_HOLD_WINDOW_US`]).
    #[serde(default)]
    pub hold_window_us: Option<u64>,
    /// DSM sequential prefetch, pages per batch at most (0: off; absent: the
    /// engine's default, see [`crate::dsm::engine::DEFAULT_PREFETCH_MAX_PAGES`]).
    #[serde(default)]
    pub prefetch_max_pages: Option<u32>,
    /// DSM range transactions for prefetch (absent: on, unless
    /// `DVMM_DSM_RANGES=0` is in the worker's environment; see
    /// [`crate::dsm::DsmConfig::ranges`]).
    #[serde(default)]
    pub dsm_ranges: Option<bool>,
    /// How messages move between the nodes: "tcp" (default; any nodes) or
    /// "shm" (shared-memory rings; all nodes on one host).
    #[serde(default)]
    pub transport: Option<String>,
    /// Give up forming the mesh after this many seconds (default 30).
    #[serde(default)]
    pub connect_timeout_s: Option<f64>,
    /// Where the VM's parts run when it is not one NUMA node per cluster node
    /// (a snapshot restored on another number of nodes); absent: node i runs
    /// `numa[i]`'s vCPUs and is home of its memory.
    #[serde(default)]
    pub placement: Option<Placement>,
}

/// Which cluster node is home of which RAM and runs which vCPU. The guest's
/// NUMA topology (its SRAT) stays what `numa` says; this is where dvmm puts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// The RAM each node is home of, `[mem_start, mem_size]` (RAM offsets),
    /// in node order, consecutive from 0.
    pub homes: Vec<[u64; 2]>,
    /// The node of each vCPU.
    pub vcpu_node: Vec<usize>,
}

impl Placement {
    /// One NUMA node per cluster node.
    pub fn of_numa(numa: &[NumaNode]) -> Placement {
        let vcpus: usize = numa.iter().map(|n| n.cpus.len()).sum();
        let mut vcpu_node = vec![0; vcpus];
        for (k, n) in numa.iter().enumerate() {
            for &c in &n.cpus {
                if let Some(x) = vcpu_node.get_mut(c as usize) {
                    *x = k;
                }
            }
        }
        Placement {
            homes: numa.iter().map(|n| [n.mem_start, n.mem_size]).collect(),
            vcpu_node,
        }
    }

    /// The RAM node `k` is home of (bytes, RAM offsets).
    pub fn home(&self, k: usize) -> std::ops::Range<u64> {
        self.homes
            .get(k)
            .map_or(0..0, |&[start, size]| start..start + size)
    }

    /// The vCPUs node `k` runs, ascending.
    pub fn vcpus_of(&self, k: usize) -> Vec<u32> {
        (0..self.vcpu_node.len() as u32)
            .filter(|&v| self.vcpu_node[v as usize] == k)
            .collect()
    }

    fn validate(&self, nodes: usize, numa: &[NumaNode]) -> Result<(), ClusterSpecError> {
        let bad = |s: String| Err(ClusterSpecError::Placement(s));
        if self.homes.len() != nodes {
            return bad(format!(
                "{} home ranges for {nodes} nodes",
                self.homes.len()
            ));
        }
        let mut at = 0;
        for (k, &[start, size]) in self.homes.iter().enumerate() {
            if start != at || size % 4096 != 0 {
                return bad(format!(
                    "homes[{k}] = [{start:#x}, {size:#x}]: expected a multiple of 4 KiB from {at:#x}"
                ));
            }
            at += size;
        }
        let memory: u64 = numa.iter().map(|n| n.mem_size).sum();
        if at != memory {
            return bad(format!("the homes cover {at:#x} bytes of {memory:#x}"));
        }
        let vcpus: usize = numa.iter().map(|n| n.cpus.len()).sum();
        if self.vcpu_node.len() != vcpus {
            return bad(format!(
                "vcpu_node has {} entries for {vcpus} vCPUs",
                self.vcpu_node.len()
            ));
        }
        if let Some(v) = self.vcpu_node.iter().position(|&k| k >= nodes) {
            return bad(format!(
                "vcpu_node[{v}] = {}: no such node",
                self.vcpu_node[v]
            ));
        }
        Ok(())
    }
}

/// Default foreign budget, in percent of the node's own share: a node holds
/// at most its share plus half of it again, so a VM bigger than any one node
/// still fits when its nodes together have room (memory aggregation).
pub const DEFAULT_FOREIGN_BUDGET_PERCENT: usize = 50;

/// The foreign budget (pages) of a node whose share is `share_pages`.
pub fn default_foreign_budget(share_pages: usize) -> usize {
    (share_pages * DEFAULT_FOREIGN_BUDGET_PERCENT / 100).max(1)
}

/// A private key in hex that `Debug` does not print.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct PrivateKeyHex(pub String);

impl std::fmt::Debug for PrivateKeyHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "(none)"
        } else {
            "(hidden)"
        })
    }
}

/// Decode the hex string `s` of field `field` into exactly `N` bytes.
fn hex_array<const N: usize>(field: &str, s: &str) -> Result<[u8; N], ClusterSpecError> {
    let v = hex::decode(s.trim()).map_err(|source| ClusterSpecError::NotHex {
        field: field.to_string(),
        source,
    })?;
    <[u8; N]>::try_from(v.as_slice()).map_err(|_| ClusterSpecError::HexLength {
        field: field.to_string(),
        got: v.len(),
        want: N,
    })
}

impl ClusterSpec {
    /// Where the VM's parts run ([`Placement`]): the spec's, or one NUMA node
    /// per cluster node.
    pub fn placement_of(&self, numa: &[NumaNode]) -> Placement {
        self.placement
            .clone()
            .unwrap_or_else(|| Placement::of_numa(numa))
    }

    /// Check the cluster against the VM's NUMA layout; the error names the field.
    pub fn validate(&self, numa: Option<&[NumaNode]>) -> Result<(), ClusterSpecError> {
        let n = self.nodes.len();
        if n == 0 {
            return Err(ClusterSpecError::NoNodes);
        }
        if n > crate::dsm::protocol::MAX_NODES {
            return Err(ClusterSpecError::TooManyNodes(n));
        }
        if self.node_index >= n {
            return Err(ClusterSpecError::NodeIndex {
                index: self.node_index,
                nodes: n,
            });
        }
        if self.boot_node >= n {
            return Err(ClusterSpecError::BootNode {
                index: self.boot_node,
                nodes: n,
            });
        }
        let Some(numa) = numa else {
            return Err(ClusterSpecError::NoNuma(n));
        };
        match &self.placement {
            Some(p) => {
                p.validate(n, numa)?;
                if p.vcpu_node.first() != Some(&self.boot_node) {
                    return Err(ClusterSpecError::Placement(format!(
                        "vCPU 0 (the BSP) must run on the boot node {}",
                        self.boot_node
                    )));
                }
            }
            None => {
                if numa.len() != n {
                    return Err(ClusterSpecError::NumaCount {
                        numa: numa.len(),
                        nodes: n,
                    });
                }
                if !numa[self.boot_node].cpus.contains(&0) {
                    return Err(ClusterSpecError::BspNotOnBootNode(self.boot_node));
                }
            }
        }
        self.addrs()?;
        self.keys()?;
        self.transport_kind()?;
        if let Some(t) = self.connect_timeout_s {
            if !(t.is_finite() && t > 0.0) {
                return Err(ClusterSpecError::ConnectTimeout(t));
            }
        }
        Ok(())
    }

    /// The nodes' socket addresses.
    pub fn addrs(&self) -> Result<Vec<SocketAddr>, ClusterSpecError> {
        let mut out: Vec<SocketAddr> = Vec::with_capacity(self.nodes.len());
        for (i, nd) in self.nodes.iter().enumerate() {
            let a: SocketAddr = nd.addr.parse().map_err(|source| ClusterSpecError::Addr {
                index: i,
                addr: nd.addr.clone(),
                source,
            })?;
            if out.contains(&a) {
                return Err(ClusterSpecError::AddrTwice { index: i, addr: a });
            }
            out.push(a);
        }
        Ok(out)
    }

    /// The transport the spec asks for.
    pub fn transport_kind(&self) -> Result<TransportKind, ClusterSpecError> {
        match self.transport.as_deref() {
            None | Some("tcp") => Ok(TransportKind::Tcp),
            Some("shm") => Ok(TransportKind::Shm),
            Some(t) => Err(ClusterSpecError::Transport(t.to_string())),
        }
    }

    /// This node's data-plane keys (the private key must match its public key).
    pub fn keys(&self) -> Result<NodeKeys, ClusterSpecError> {
        let n = self.nodes.len();
        if self.node_pubkeys_hex.len() != n {
            return Err(ClusterSpecError::PubkeyCount {
                keys: self.node_pubkeys_hex.len(),
                nodes: n,
            });
        }
        let pubs = self
            .node_pubkeys_hex
            .iter()
            .enumerate()
            .map(|(i, h)| hex_array::<32>(&format!("cluster.node_pubkeys_hex[{i}]"), h))
            .collect::<Result<Vec<_>, _>>()?;
        if self.private_key_hex.0.is_empty() {
            return Err(ClusterSpecError::NoPrivateKey);
        }
        let private = hex_array::<32>("cluster.private_key_hex", &self.private_key_hex.0)?;
        let session =
            hex_array::<{ auth::SESSION_SIZE }>("cluster.session_hex", &self.session_hex)?;
        let mode = self.security.as_deref().unwrap_or("encrypt");
        let protection =
            Protection::parse(mode).ok_or_else(|| ClusterSpecError::Security(mode.to_string()))?;
        let me = NodeId::try_from(self.node_index)
            .map_err(|_| ClusterSpecError::NodeIndexTooLarge(self.node_index))?;
        NodeKeys::new(me, private, &pubs, session, protection).map_err(ClusterSpecError::Keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_validation_names_fields() {
        let numa = vec![
            NumaNode {
                cpus: vec![0],
                mem_start: 0,
                mem_size: 16 << 20,
            },
            NumaNode {
                cpus: vec![1],
                mem_start: 16 << 20,
                mem_size: 16 << 20,
            },
        ];
        let ok = ClusterSpec {
            node_index: 1,
            nodes: vec![
                ClusterNodeSpec {
                    addr: "127.0.0.1:7100".into(),
                },
                ClusterNodeSpec {
                    addr: "127.0.0.2:7100".into(),
                },
            ],
            security: None,
            session_hex: "00112233445566778899aabbccddeeff".into(),
            // RFC 7748 section 6.1: Alice's and Bob's keys; this is node 1 (Bob).
            node_pubkeys_hex: vec![
                "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a".into(),
                "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f".into(),
            ],
            private_key_hex: PrivateKeyHex(
                "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb".into(),
            ),
            boot_node: 0,
            foreign_budget_pages: None,
            hold_window_us: None,
            prefetch_max_pages: None,
            dsm_ranges: None,
            transport: None,
            connect_timeout_s: None,
            placement: None,
        };
        ok.validate(Some(&numa)).unwrap();
        let e = |f: &dyn Fn(&mut ClusterSpec)| {
            let mut c = ok.clone();
            f(&mut c);
            c.validate(Some(&numa)).unwrap_err().to_string()
        };
        assert!(e(&|c| c.node_index = 2).contains("cluster.node_index"));
        assert!(e(&|c| c.boot_node = 5).contains("cluster.boot_node"));
        assert!(e(&|c| c.boot_node = 1).contains("BSP"));
        assert!(e(&|c| c.nodes[1].addr = "nowhere".into()).contains("cluster.nodes[1].addr"));
        assert!(e(&|c| c.nodes[1].addr = "127.0.0.1:7100".into()).contains("another node"));
        assert!(e(&|c| c.session_hex = "zz".into()).contains("cluster.session_hex"));
        assert!(e(&|c| c.session_hex = "0011".into()).contains("16 are required"));
        assert!(e(&|c| c.node_pubkeys_hex.pop().map(drop).unwrap_or(())).contains("one per node"));
        assert!(e(&|c| c.private_key_hex = PrivateKeyHex(String::new())).contains("missing"));
        // Alice's private key is not node 1's.
        assert!(e(&|c| c.private_key_hex = PrivateKeyHex(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a".into()
        ))
        .contains("does not match"));
        assert!(e(&|c| c.security = Some("rot13".into())).contains("cluster.security"));
        assert!(e(&|c| c.transport = Some("pigeon".into())).contains("cluster.transport"));
        assert!(
            !format!("{ok:?}").contains("5dab087e"),
            "Debug must hide the private key"
        );
        let json = serde_json::to_string(&ok).unwrap();
        assert!(
            !json.contains("5dab087e"),
            "the private key is never serialized"
        );
        assert!(ok
            .validate(Some(&numa[..1]))
            .unwrap_err()
            .to_string()
            .contains("numa"));
        assert!(ok.validate(None).unwrap_err().to_string().contains("numa"));
    }

    #[test]
    fn placement_decouples_nodes_from_numa() {
        // The guest's two NUMA nodes (vCPUs 0,1 | 2), placed on three nodes.
        let numa = vec![
            NumaNode {
                cpus: vec![0, 1],
                mem_start: 0,
                mem_size: 32 << 20,
            },
            NumaNode {
                cpus: vec![2],
                mem_start: 32 << 20,
                mem_size: 16 << 20,
            },
        ];
        let p = Placement {
            homes: vec![[0, 16 << 20], [16 << 20, 16 << 20], [32 << 20, 16 << 20]],
            vcpu_node: vec![0, 1, 2],
        };
        p.validate(3, &numa).unwrap();
        assert_eq!(p.home(1), (16 << 20)..(32 << 20));
        assert_eq!(p.vcpus_of(2), vec![2]);
        assert_eq!(p.home(7), 0..0);
        let err = |q: Placement| q.validate(3, &numa).unwrap_err().to_string();
        let mut q = p.clone();
        q.homes[1][0] += 4096;
        assert!(err(q).contains("homes[1]"));
        let mut q = p.clone();
        q.homes.pop();
        assert!(err(q).contains("2 home ranges for 3 nodes"));
        let mut q = p.clone();
        q.homes[2][1] -= 4096;
        assert!(err(q).contains("cover"));
        let mut q = p.clone();
        q.vcpu_node[2] = 3;
        assert!(err(q).contains("no such node"));
        let mut q = p.clone();
        q.vcpu_node.pop();
        assert!(err(q).contains("for 3 vCPUs"));
        // Without a placement: one NUMA node per cluster node.
        let d = Placement::of_numa(&numa);
        assert_eq!(d.vcpu_node, vec![0, 0, 1]);
        assert_eq!(d.home(1), (32 << 20)..(48 << 20));
    }
}
