//! A reload: the new configuration applied to the running daemon, site by
//! site and federation by federation (kept, changed in place, added,
//! removed after their answers), and the report of what it did.

use super::*;

/// What a reload did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// Sites added.
    pub added: Vec<String>,
    /// Sites removed (their answers in progress finish first).
    pub removed: Vec<String>,
    /// Sites whose settings changed in place.
    pub changed: Vec<String>,
    /// Sites with a new address or TLS settings: new channels.
    pub reconnected: Vec<String>,
    /// Sites left exactly as they were.
    pub kept: usize,
    /// Global keys that only a restart applies.
    pub needs_restart: Vec<&'static str>,
    /// Sites (and federations, as `federation NAME`) whose change could
    /// not be applied, and why.
    pub failed: Vec<(String, String)>,
    /// Federations added.
    pub federations_added: Vec<String>,
    /// Federations removed (their answers in progress finish first).
    pub federations_removed: Vec<String>,
    /// Federations whose definition changed (in place; their clients stay).
    pub federations_changed: Vec<String>,
}

impl std::fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: &[String]| if v.is_empty() { "none".to_owned() } else { v.join(", ") };
        write!(
            f,
            "added: {}; removed: {}; changed in place: {}; new channels: {}; kept: {}",
            list(&self.added),
            list(&self.removed),
            list(&self.changed),
            list(&self.reconnected),
            self.kept
        )?;
        let feds = [
            ("federations added", &self.federations_added),
            ("federations removed", &self.federations_removed),
            ("federations changed", &self.federations_changed),
        ];
        for (what, names) in feds {
            if !names.is_empty() {
                write!(f, "; {what}: {}", names.join(", "))?;
            }
        }
        if !self.needs_restart.is_empty() {
            write!(f, "; needs a restart to apply: {}", self.needs_restart.join(", "))?;
        }
        for (site, why) in &self.failed {
            write!(f, "; site '{site}' not applied: {why}")?;
        }
        Ok(())
    }
}

impl App {
    /// Apply the reloaded `[[federation]]` tables (after the sites, whose
    /// handles they take): an unchanged federation keeps its socket and
    /// clients (it only takes the sites' current handles); a changed one
    /// changes in place (its TCP listener rebound on a new `listen`); an
    /// added one is bound and served; a removed one stops accepting and its
    /// socket goes once its answers in progress are done.
    fn reload_federations(&mut self, new: &Config, report: &mut ReloadReport) {
        let keep: std::collections::HashSet<&str> = new.federations.iter().map(|f| f.name.as_str()).collect();
        let (gone, stay): (Vec<FederationRuntime>, Vec<FederationRuntime>) =
            std::mem::take(&mut self.federations).into_iter().partition(|f| !keep.contains(f.fed.name.as_str()));
        self.federations = stay;
        for f in gone {
            report.federations_removed.push(f.fed.name.clone());
            self.retire_federation(f);
        }
        for cfg in &new.federations {
            let sites: Vec<SiteHandle> = cfg.sites.iter().filter_map(|n| self.site(n)).collect();
            match self.federations.iter().position(|f| f.fed.name == cfg.name) {
                Some(i) => {
                    let old = self.federations[i].fed.setup().cfg.clone();
                    if old != *cfg {
                        if old.client.socket != cfg.client.socket
                            && let Err(e) =
                                self.federations[i].socket.set_ownership(&old.client.socket, &cfg.client.socket)
                        {
                            report.failed.push((format!("federation {}", cfg.name), e.to_string()));
                            continue;
                        }
                        if old.listen != cfg.listen
                            && let Err(why) = self.move_federation_tcp(i, cfg)
                        {
                            report.failed.push((format!("federation {}", cfg.name), why));
                            continue;
                        }
                        report.federations_changed.push(cfg.name.clone());
                    }
                    self.federations[i].fed.replace(cfg.clone(), sites);
                }
                None => match bind_federation(&self.config, cfg) {
                    Ok(b) => {
                        self.start_federation(cfg.clone(), b);
                        report.federations_added.push(cfg.name.clone());
                    }
                    Err(e) => report.failed.push((format!("federation {}", cfg.name), e.to_string())),
                },
            }
        }
        let order: Vec<&str> = new.federations.iter().map(|f| f.name.as_str()).collect();
        self.federations.sort_by_key(|f| order.iter().position(|n| *n == f.fed.name).unwrap_or(usize::MAX));
        self.publish_federations();
    }

    /// A federation's TCP listener for a changed `listen`: on the same
    /// address its settings change in place; on another the new one is
    /// bound before the old one stops (a failure leaves the old in place).
    fn move_federation_tcp(&mut self, i: usize, cfg: &crate::config::FederationConfig) -> Result<(), String> {
        let tls = match cfg.listen.as_ref().and_then(|l| l.tls.as_ref()) {
            Some(t) => Some(tokio_rustls::TlsAcceptor::from(crate::tls::server_config(t).map_err(|e| e.to_string())?)),
            None => None,
        };
        if let (Some(t), Some(l)) = (&self.federations[i].tcp, &cfg.listen)
            && t.addr == l.addr
        {
            *t.settings.write().unwrap_or_else(|e| e.into_inner()) = (l.clone(), tls);
            return Ok(());
        }
        let fresh = match &cfg.listen {
            Some(l) => Some((listener::bind_tcp(l).map_err(|e| e.to_string())?, l.clone(), tls)),
            None => None,
        };
        let rt = &self.federations[i];
        let tcp = fresh.map(|(t, l, tls)| self.serve_federation_tcp(&rt.fed, t, l, tls, &rt.sessions));
        if let Some(old) = std::mem::replace(&mut self.federations[i].tcp, tcp) {
            old.stop.cancel();
        }
        Ok(())
    }

    /// A removed federation: stop accepting now; once its sessions are done
    /// (at most `shutdown_grace`) its socket file goes.
    fn retire_federation(&self, f: FederationRuntime) {
        let tcp = f.tcp.as_ref().map(|t| &t.stop);
        let what = format!("federation '{}'", f.fed.name);
        wind_down(
            &self.retiring_federations,
            self.config.shutdown_grace,
            what,
            &f.stop,
            tcp,
            f.sessions.clone(),
            move || {
                f.socket.remove();
            },
        );
    }

    /// Apply a new, validated configuration without a restart: unchanged
    /// sites are not touched; changed ones get their new settings in place
    /// (a new address or TLS settings: new channels, while queries in
    /// flight finish on the old ones); added sites are bound and started;
    /// removed sites stop accepting and go once their answers in progress
    /// are done (up to `shutdown_grace`). Global keys that need a restart
    /// are reported and otherwise ignored. One log line says what happened.
    pub async fn reload(&mut self, new: Config) -> ReloadReport {
        let mut report =
            ReloadReport { needs_restart: crate::config::restart_keys(&self.config, &new), ..Default::default() };
        // Removed sites first: their names (and sockets) may be reused.
        let keep: std::collections::HashSet<&str> = new.sites.iter().map(|s| s.name.as_str()).collect();
        let (gone, stay): (Vec<SiteRuntime>, Vec<SiteRuntime>) =
            std::mem::take(&mut self.sites).into_iter().partition(|s| !keep.contains(s.config.name.as_str()));
        self.sites = stay;
        for site in gone {
            report.removed.push(site.config.name.clone());
            self.inventory_control(crate::inventory::Control::Stop(site.config.name.clone())).await;
            self.retire(site);
        }
        let mut order = Vec::with_capacity(new.sites.len());
        for cfg in &new.sites {
            let name = cfg.name.clone();
            match self.sites.iter().position(|s| s.config.name == name) {
                Some(i) if self.sites[i].config == *cfg => report.kept += 1,
                Some(i) => match self.change_site(i, cfg.clone()).await {
                    Ok(reconnect) => {
                        if reconnect {
                            report.reconnected.push(name.clone())
                        } else {
                            report.changed.push(name.clone())
                        }
                    }
                    Err(why) => report.failed.push((name.clone(), why)),
                },
                None => {
                    let added = prepare_tls(&Config { sites: vec![cfg.clone()], ..new.clone() })
                        .map_err(|e| e.to_string())
                        .and_then(|mut t| {
                            let b = bind_site(&self.config, cfg).map_err(|e| e.to_string())?;
                            Ok((b, t.remove(0)))
                        });
                    match added {
                        Ok((b, tls)) => {
                            self.start_site(cfg.clone(), b, tls);
                            report.added.push(name.clone());
                            if new.inventory.is_some() && cfg.params.inventory {
                                let h = self.sites.last().map(|s| s.handle.clone());
                                if let Some(h) = h {
                                    self.inventory_control(crate::inventory::Control::Start(h)).await;
                                }
                            }
                        }
                        Err(why) => report.failed.push((name.clone(), why)),
                    }
                }
            }
            order.push(name);
        }
        // Configuration order, as in the file.
        self.sites.sort_by_key(|s| order.iter().position(|n| *n == s.config.name).unwrap_or(usize::MAX));
        self.publish_sites();
        // What applies in place of the global keys.
        self.config.shutdown_grace = new.shutdown_grace;
        self.config.request_memory_budget = new.request_memory_budget;
        self.config.request_memory_wait = new.request_memory_wait;
        self.shared.requests.set(new.request_memory_budget, new.request_memory_wait);
        self.config.sites = self.sites.iter().map(|s| s.config.clone()).collect();
        self.reload_federations(&new, &mut report);
        self.config.federations = self.federations.iter().map(|f| f.fed.setup().cfg.clone()).collect();
        report
    }

    /// A changed site: settings in place, new channels for a new address
    /// or TLS settings, the TCP listener adjusted. `Ok(true)` if the
    /// channels are replaced.
    async fn change_site(&mut self, i: usize, cfg: SiteConfig) -> Result<bool, String> {
        let parts = prepare_tls(&Config { sites: vec![cfg.clone()], ..self.config.clone() })
            .map_err(|e| e.to_string())?
            .remove(0);
        let site = &mut self.sites[i];
        let old = site.config.clone();
        let reconnect = crate::config::replaces_channels(&old, &cfg);
        // The socket's mode and group, in place (first: a failure leaves
        // the site as it was).
        if old.params.socket != cfg.params.socket {
            site.socket.set_ownership(&old.params.socket, &cfg.params.socket).map_err(|e| e.to_string())?;
        }
        // The TCP listener: rebind on a new address, else settings in place.
        match (&mut site.tcp, cfg.listen.clone()) {
            (Some(t), Some(listen)) if t.addr == listen.addr => {
                *t.settings.write().unwrap_or_else(|e| e.into_inner()) =
                    Arc::new(listener::TcpSettings { listen, tls: parts.server });
            }
            (current, want) => {
                let fresh = match &want {
                    Some(l) => Some(listener::bind_tcp(l).map_err(|e| e.to_string())?),
                    None => None,
                };
                if let Some(t) = current.take() {
                    t.stop.cancel();
                }
                if let (Some(t), Some(listen)) = (fresh, want) {
                    let ctx = listener::Accepting {
                        site: site.handle.clone(),
                        shutdown: site.stop.clone(),
                        tracker: site.sessions.clone(),
                        shared: self.shared.clone(),
                        limit: site.limit.clone(),
                        failing: Default::default(),
                    };
                    let settings =
                        Arc::new(std::sync::RwLock::new(Arc::new(listener::TcpSettings { listen, tls: parts.server })));
                    site.tcp = Some(spawn_tcp(t, settings, &ctx));
                }
            }
        }
        site.limit.set(cfg.params.max_clients);
        site.handle.reconfigure(cfg.clone(), parts.client).await;
        site.config = cfg.clone();
        let handle = site.handle.clone();
        if self.config.inventory.is_some() {
            if !cfg.params.inventory {
                self.inventory_control(crate::inventory::Control::Stop(cfg.name.clone())).await;
            } else if reconnect || !old.params.inventory {
                self.inventory_control(crate::inventory::Control::Start(handle)).await;
            }
        }
        Ok(reconnect)
    }

    /// A removed site: stop accepting now; once its sessions are done (at
    /// most `shutdown_grace`) its socket file goes and its actor stops.
    fn retire(&self, site: SiteRuntime) {
        let tcp = site.tcp.as_ref().map(|t| &t.stop);
        let what = format!("site '{}'", site.config.name);
        wind_down(
            &self.retiring,
            self.config.shutdown_grace,
            what,
            &site.stop,
            tcp,
            site.sessions.clone(),
            move || {
                site.socket.remove();
                site.actor_stop.cancel();
            },
        );
    }

    /// Record a reload's outcome (state file) and log it.
    pub fn note_reload(&self, outcome: Result<&ReloadReport, String>) {
        let mut r = self.state.reloads.lock().unwrap_or_else(|e| e.into_inner());
        let at = crate::site::timestamp(std::time::SystemTime::now());
        match outcome {
            Ok(report) if report.failed.is_empty() => {
                r.ok += 1;
                tracing::info!("configuration reloaded: {report}");
                r.last = Some(crate::state::LastReload { at, ok: true, message: report.to_string() });
            }
            Ok(report) => {
                r.failed += 1;
                tracing::error!("configuration reloaded in part: {report}");
                r.last = Some(crate::state::LastReload { at, ok: false, message: report.to_string() });
            }
            Err(why) => {
                r.failed += 1;
                tracing::error!("configuration not reloaded, still running on the previous one:\n{why}");
                r.last = Some(crate::state::LastReload { at, ok: false, message: why });
            }
        }
    }
}
