//! The synthetic monitoring data a simulated site serves.
//!
//! Nothing is stored per object: host `i` and service `j` of host `i` are
//! computed from their indices, so a site with 100,000 services costs a few
//! bytes. Only states changed by `PROCESS_*_CHECK_RESULT` commands are kept,
//! in small override maps. States follow fixed rules, so tests can predict
//! them: a host is DOWN when `i % 50 == 49`; a service with global index `g`
//! is WARNING when `g % 7 == 3`, else CRITICAL when `g % 13 == 5`, else
//! UNKNOWN when `g % 29 == 11`, else OK.

use std::collections::HashMap;

use crate::inventory::Inventory;

/// Service descriptions, in order; beyond these come `svc-012`, `svc-013`, ...
const SERVICE_NAMES: [&str; 12] =
    ["ping", "cpu", "memory", "load", "disk-root", "disk-var", "swap", "procs", "ssh", "http", "ntp", "users"];

/// Host roles, also host group names (`i % 4`).
pub const ROLES: [&str; 4] = ["web", "db", "app", "infra"];

/// Fixed `last_check` of every object, so answers are reproducible.
const LAST_CHECK: i64 = 1_700_000_000;

/// A cell value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// An integer column.
    Int(i64),
    /// A floating-point column.
    Float(f64),
    /// A string column.
    Str(String),
    /// A list column.
    List(Vec<String>),
    /// A blob column (bytes).
    Blob(Vec<u8>),
}

/// The tables a simulated site knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `hosts`
    Hosts,
    /// `services`
    Services,
    /// `hostgroups`
    Hostgroups,
    /// `status` (one row)
    Status,
}

impl Table {
    /// The table for a name.
    pub fn by_name(name: &str) -> Option<Table> {
        Some(match name {
            "hosts" => Table::Hosts,
            "services" => Table::Services,
            "hostgroups" => Table::Hostgroups,
            "status" => Table::Status,
            _ => return None,
        })
    }

    /// Columns a query names explicitly but a query without `Columns:` does
    /// not return (the inventory's blobs, as they are large).
    pub fn extra_columns(self) -> &'static [&'static str] {
        match self {
            Table::Hosts => &["mk_inventory_last", "mk_inventory", "mk_inventory_gz"],
            Table::Status => &["mk_inventory_last"],
            _ => &[],
        }
    }

    /// Column names, in the order a query without `Columns:` returns them.
    pub fn columns(self) -> &'static [&'static str] {
        match self {
            Table::Hosts => &[
                "name",
                "alias",
                "address",
                "state",
                "has_been_checked",
                "plugin_output",
                "perf_data",
                "groups",
                "num_services",
                "num_services_ok",
                "num_services_warn",
                "num_services_crit",
                "num_services_unknown",
                "last_check",
                "acknowledged",
                "scheduled_downtime_depth",
                "check_command",
                "notes",
                "latency",
            ],
            Table::Services => &[
                "host_name",
                "description",
                "display_name",
                "state",
                "has_been_checked",
                "plugin_output",
                "perf_data",
                "groups",
                "last_check",
                "acknowledged",
                "scheduled_downtime_depth",
                "check_command",
                "host_state",
                "host_alias",
                "latency",
            ],
            Table::Hostgroups => &["name", "alias", "members", "num_hosts"],
            Table::Status => &[
                "program_start",
                "program_version",
                "livestatus_version",
                "num_hosts",
                "num_services",
                "nagios_pid",
                "core_pid",
                "connections",
                "requests",
                "interval_length",
            ],
        }
    }
}

/// Counters shown in the `status` table.
#[derive(Debug, Clone, Copy, Default)]
pub struct StatusCounters {
    /// `program_start`.
    pub program_start: i64,
    /// Connections accepted so far.
    pub connections: u64,
    /// Requests answered so far.
    pub requests: u64,
}

/// The site's objects.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Site name, part of host aliases so sites can be told apart.
    pub site: String,
    /// Number of hosts.
    pub hosts: usize,
    /// Services per host.
    pub services_per_host: usize,
    host_state: HashMap<usize, (i64, String)>,
    service_state: HashMap<usize, (i64, String)>,
    /// Host names set by tests (hostile names, say), by host index.
    renamed: HashMap<usize, String>,
    /// HW/SW inventory (`mk_inventory*` columns).
    pub inventory: Inventory,
    /// Host names are this and a number (`host-0042`).
    pub host_prefix: String,
}

impl Dataset {
    /// A dataset with `hosts` hosts of `services_per_host` services each.
    pub fn new(site: &str, hosts: usize, services_per_host: usize) -> Self {
        Dataset {
            site: site.to_owned(),
            hosts,
            services_per_host,
            host_state: HashMap::new(),
            service_state: HashMap::new(),
            renamed: HashMap::new(),
            inventory: Inventory::default(),
            host_prefix: "host-".to_owned(),
        }
    }

    /// Rows in a table.
    pub fn rows(&self, t: Table) -> usize {
        match t {
            Table::Hosts => self.hosts,
            Table::Services => self.hosts * self.services_per_host,
            Table::Hostgroups => ROLES.len() + 1,
            Table::Status => 1,
        }
    }

    /// Name of host `i`.
    pub fn host_name(&self, i: usize) -> String {
        if let Some(n) = self.renamed.get(&i) {
            return n.clone();
        }
        let width = (self.hosts.saturating_sub(1)).to_string().len().max(4);
        format!("{}{i:0width$}", self.host_prefix)
    }

    /// Index of a host by name.
    pub fn host_index(&self, name: &str) -> Option<usize> {
        if let Some((i, _)) = self.renamed.iter().find(|(_, n)| *n == name) {
            return Some(*i);
        }
        let i: usize = name.strip_prefix(self.host_prefix.as_str())?.parse().ok()?;
        (i < self.hosts && self.host_name(i) == name).then_some(i)
    }

    /// Description of service `j` (of any host).
    pub fn service_name(j: usize) -> String {
        SERVICE_NAMES.get(j).map_or_else(|| format!("svc-{j:03}"), |s| (*s).to_owned())
    }

    /// Give host `i` another name.
    pub fn rename_host(&mut self, i: usize, name: &str) {
        self.renamed.insert(i, name.to_owned());
    }

    /// Set a host's state and output (from `PROCESS_HOST_CHECK_RESULT`).
    pub fn set_host_state(&mut self, host: usize, state: i64, output: String) {
        self.host_state.insert(host, (state, output));
    }

    /// Set a service's state and output (from `PROCESS_SERVICE_CHECK_RESULT`).
    pub fn set_service_state(&mut self, host: usize, svc: &str, state: i64, output: String) {
        let j = (0..self.services_per_host).find(|&j| Self::service_name(j) == svc);
        if let Some(j) = j {
            self.service_state.insert(host * self.services_per_host + j, (state, output));
        }
    }

    fn host_state(&self, i: usize) -> (i64, String) {
        if let Some(s) = self.host_state.get(&i) {
            return s.clone();
        }
        if i % 50 == 49 {
            (1, "PING CRITICAL - Packet loss = 100%".to_owned())
        } else {
            (0, format!("PING OK - Packet loss = 0%, RTA = {}.{:02} ms", i % 7, i % 100))
        }
    }

    fn service_state(&self, g: usize) -> (i64, String) {
        if let Some(s) = self.service_state.get(&g) {
            return s.clone();
        }
        let state = if g % 7 == 3 {
            1
        } else if g % 13 == 5 {
            2
        } else if g % 29 == 11 {
            3
        } else {
            0
        };
        let label = ["OK", "WARNING", "CRITICAL", "UNKNOWN"][state as usize];
        let j = g % self.services_per_host.max(1);
        (state, format!("{label} - {} value {}%", Self::service_name(j), g % 100))
    }

    fn count_services(&self, host: usize, state: i64) -> i64 {
        let base = host * self.services_per_host;
        (base..base + self.services_per_host).filter(|&g| self.service_state(g).0 == state).count() as i64
    }

    /// The value of column `col` (a name from [`Table::columns`]) in `row`.
    pub fn cell(&self, t: Table, row: usize, col: &str, status: &StatusCounters) -> Option<Value> {
        match t {
            Table::Hosts => self.host_cell(row, col),
            Table::Services => self.service_cell(row, col),
            Table::Hostgroups => self.group_cell(row, col),
            Table::Status => self.status_cell(col, status),
        }
    }

    fn host_cell(&self, i: usize, col: &str) -> Option<Value> {
        use Value::*;
        let n = self.services_per_host as i64;
        Some(match col {
            "name" => Str(self.host_name(i)),
            "alias" => Str(format!("Host {i} of {}", self.site)),
            "address" => Str(format!("10.{}.{}.{}", i >> 16 & 255, i >> 8 & 255, i & 255)),
            "state" => Int(self.host_state(i).0),
            "has_been_checked" => Int(1),
            "plugin_output" => Str(self.host_state(i).1),
            "perf_data" => Str(format!("rta={}.{:02}ms;100;500;0 pl=0%;20;60;0", i % 7, i % 100)),
            "groups" => List(vec!["all".to_owned(), ROLES[i % 4].to_owned()]),
            "num_services" => Int(n),
            "num_services_ok" => Int(self.count_services(i, 0)),
            "num_services_warn" => Int(self.count_services(i, 1)),
            "num_services_crit" => Int(self.count_services(i, 2)),
            "num_services_unknown" => Int(self.count_services(i, 3)),
            "last_check" => Int(LAST_CHECK + (i % 60) as i64),
            "acknowledged" => Int(0),
            "scheduled_downtime_depth" => Int(i64::from(i % 100 == 50)),
            "check_command" => Str("check-host-alive".to_owned()),
            "notes" => Str(format!("simulated host {i}")),
            "latency" => Float((i % 1000) as f64 / 1000.0),
            "mk_inventory_last" => Int(self.inventory.mtime(i)),
            "mk_inventory" => Blob(self.inventory.blob(i, &self.host_name(i), false)),
            "mk_inventory_gz" => Blob(self.inventory.blob(i, &self.host_name(i), true)),
            _ => return None,
        })
    }

    fn service_cell(&self, g: usize, col: &str) -> Option<Value> {
        use Value::*;
        let per = self.services_per_host.max(1);
        let (host, j) = (g / per, g % per);
        let desc = Self::service_name(j);
        Some(match col {
            "host_name" => Str(self.host_name(host)),
            "description" => Str(desc),
            "display_name" => Str(format!("{desc} on {}", self.host_name(host))),
            "state" => Int(self.service_state(g).0),
            "has_been_checked" => Int(1),
            "plugin_output" => Str(self.service_state(g).1),
            "perf_data" => Str(format!("value={}%;80;90;0;100", g % 100)),
            "groups" => List(vec![format!("sg-{desc}")]),
            "last_check" => Int(LAST_CHECK + (g % 60) as i64),
            "acknowledged" => Int(0),
            "scheduled_downtime_depth" => Int(i64::from(host % 100 == 50)),
            "check_command" => Str(format!("check_{desc}")),
            "host_state" => Int(self.host_state(host).0),
            "host_alias" => Str(format!("Host {host} of {}", self.site)),
            "latency" => Float((g % 1000) as f64 / 1000.0),
            _ => return None,
        })
    }

    fn group_cell(&self, row: usize, col: &str) -> Option<Value> {
        use Value::*;
        let (name, members): (&str, Vec<String>) = if row == 0 {
            ("all", (0..self.hosts).map(|i| self.host_name(i)).collect())
        } else {
            let r = row - 1;
            let m = (r..self.hosts).step_by(4).map(|i| self.host_name(i)).collect();
            (ROLES[r], m)
        };
        Some(match col {
            "name" => Str(name.to_owned()),
            "alias" => Str(format!("Group {name}")),
            "num_hosts" => Int(members.len() as i64),
            "members" => List(members),
            _ => return None,
        })
    }

    fn status_cell(&self, col: &str, st: &StatusCounters) -> Option<Value> {
        use Value::*;
        Some(match col {
            "program_start" => Int(st.program_start),
            "program_version" => Str(concat!("livemux-simsite ", env!("CARGO_PKG_VERSION")).into()),
            "livestatus_version" => Str(env!("CARGO_PKG_VERSION").to_owned()),
            "num_hosts" => Int(self.hosts as i64),
            "num_services" => Int((self.hosts * self.services_per_host) as i64),
            "nagios_pid" | "core_pid" => Int(i64::from(std::process::id())),
            "connections" => Int(st.connections as i64),
            "requests" => Int(st.requests as i64),
            "interval_length" => Int(60),
            "mk_inventory_last" => Int(self.inventory.last),
            _ => return None,
        })
    }
}
