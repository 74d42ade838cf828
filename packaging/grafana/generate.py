#!/usr/bin/env python3
"""Writes the Grafana dashboards in this directory (run it here after changing a panel).

The JSON files are what the chorus package installs; tests/system/metrics.rs checks that
every query names only metrics the services export and that promtool parses it."""
import json
def ds(): return {"type":"prometheus","uid":"${datasource}"}
def panel(pid,title,exprs,x,y,w=12,h=8,unit="short",kind="timeseries",desc=""):
    p={"id":pid,"type":kind,"title":title,"datasource":ds(),"gridPos":{"x":x,"y":y,"w":w,"h":h},
       "fieldConfig":{"defaults":{"unit":unit},"overrides":[]},"options":{},
       "targets":[{"refId":chr(65+i),"datasource":ds(),"expr":e,"legendFormat":l} for i,(e,l) in enumerate(exprs)]}
    if desc: p["description"]=desc
    return p
def dashboard(uid,title,desc,panels,var_metric):
    var_query = "label_values(%s, instance)"%var_metric if not var_metric.startswith("{") else "label_values(%s, instance)"%var_metric
    return {"uid":uid,"title":title,"description":desc,"tags":["chorus"],"timezone":"browser","schemaVersion":39,"version":1,
     "editable":True,"refresh":"30s","time":{"from":"now-6h","to":"now"},
     "templating":{"list":[
       {"name":"datasource","type":"datasource","query":"prometheus","label":"Data source","current":{}},
       {"name":"instance","type":"query","datasource":ds(),"query":{"query":var_query,"refId":"instance"},
        "definition":var_query,"includeAll":True,"allValue":".*","multi":True,"current":{},"refresh":2,"label":"Instance"}]},
     "panels":panels}
I='{instance=~"$instance"}'
LC='{instance=~"$instance",stream="CHORUS_LIFECYCLE"}'
dashes={}
dashes["chorus-fleet.json"]=dashboard("chorus-fleet","Chorus / Fleet","Nodes by status and version, and event rates, from the inventory (chorus dashboard, chorus inventory serve, chorus up).",[
 panel(1,"Nodes by status",[(f"sum by (status) (chorus_nodes{I})","{{status}}")],0,0),
 panel(2,"Versions (rollout)",[(f"sum by (component, version) (chorus_node_versions{I})","{{component}} {{version}}")],12,0),
 panel(3,"Events stored per second",[(f"sum by (stream) (chorus_stream_events_per_second{I})","{{stream}}")],0,8,unit="ops"),
 panel(4,"Inventory lag (events)",[(f"max by (instance) (chorus_stream_last_sequence{LC}) - on (instance) max by (instance) (chorus_inventory_checkpoint{I})","{{instance}}")],12,8,
   desc="Lifecycle events stored but not yet applied to the inventory."),
],"chorus_nodes")
dashes["chorus-agent.json"]=dashboard("chorus-agent","Chorus / Node agents","Node agents (chorus agent --listen): RPC requests and Action Policy, outbox backlog and forwarding, autonomous agents.",[
 panel(1,"Agents: reporting / unhealthy",[(f"count(chorus_agent_healthy{I}) or vector(0)","reporting"),(f"count(chorus_agent_healthy{I} == 0) or vector(0)","unhealthy")],0,0,w=6,h=4,kind="stat",
   desc="Agents scraped, and those whose /healthz is failing. An agent that is down stops reporting: alert on the first number falling."),
 panel(2,"Outbox backlog",[(f"sum(chorus_outbox_backlog{I})","backlog")],6,0,w=6,h=4,kind="stat"),
 panel(3,"Autonomous agents",[(f"sum(chorus_agent_machines{I})","machines")],12,0,w=6,h=4,kind="stat"),
 panel(4,"External agents left out",[(f"sum(chorus_agent_external_agents_left_out{I})","left out")],18,0,w=6,h=4,kind="stat"),
 panel(5,"RPC requests per second",[
   (f"sum(rate(chorus_agent_rpc_requests_total{I}[5m]))","received"),
   (f"sum(rate(chorus_agent_rpc_passed_total{I}[5m]))","passed"),
   (f"sum(rate(chorus_agent_rpc_replies_total{I}[5m]))","replies")],0,4,unit="reqps"),
 panel(6,"RPC refused per second",[
   (f"sum(rate(chorus_agent_rpc_denied_total{I}[5m]))","denied by Action Policy"),
   (f"sum(rate(chorus_agent_rpc_ttl_expired_total{I}[5m]))","TTL expired"),
   (f"sum(rate(chorus_agent_rpc_malformed_total{I}[5m]))","malformed"),
   (f"sum(rate(chorus_agent_rpc_filtered_total{I}[5m]))","filtered out")],12,4,unit="reqps"),
 panel(7,"Outbox: stored and forwarded per second",[
   (f"sum(rate(chorus_outbox_stored_total{I}[5m]))","stored"),
   (f"sum(rate(chorus_outbox_forwarded_total{I}[5m]))","forwarded")],0,12,unit="ops"),
 panel(8,"Outbox: losses and faults (per 5 minutes)",[
   (f"sum(increase(chorus_outbox_forward_errors_total{I}[5m]))","forward errors"),
   (f"sum(increase(chorus_outbox_collapsed_alive_total{I}[5m]))","alive collapsed"),
   (f"sum(increase(chorus_outbox_dropped_watcher_states_total{I}[5m]))","watcher states dropped"),
   (f"sum(increase(chorus_outbox_refused_by_storage_total{I}[5m]))","refused by storage"),
   (f"sum(increase(chorus_outbox_storage_faults_total{I}[5m]))","storage faults")],12,12),
 panel(9,"Autonomous agent states",[(f"sum by (machine, state) (chorus_agent_machine_state{I})","{{machine}} {{state}}")],0,20),
 panel(10,"Registrations per second",[(f"sum(rate(chorus_agent_registrations_total{I}[5m]))","published")],12,20,unit="ops"),
],"chorus_agent_healthy")
dashes["chorus-replicator.json"]=dashboard("chorus-replicator","Chorus / Replicator","Site to hub links (chorus replicate): copy rate, lag in events and seconds, way of copying.",[
 panel(1,"Copied per second",[(f"sum by (link, stream) (rate(chorus_replicator_copied_total{I}[5m]))","{{link}} {{stream}}")],0,0,unit="ops"),
 panel(2,"Lag (events)",[(f"max by (link, stream) (chorus_replicator_lag_events{I})","{{link}} {{stream}}")],12,0),
 panel(3,"Lag (seconds)",[(f"max by (link, stream) (chorus_replicator_lag_seconds{I})","{{link}} {{stream}}")],0,8,unit="s"),
 panel(4,"Way of copying",[(f"max by (link, stream, path) (chorus_replicator_path{I}) == 1","{{link}} {{stream}}: {{path}}")],12,8,kind="table"),
 panel(5,"Checkpoint (source sequence)",[(f"max by (link, stream) (chorus_replicator_checkpoint{I})","{{link}} {{stream}}")],0,16,w=24),
],"chorus_replicator_copied_total")
dashes["chorus-provisioner.json"]=dashboard("chorus-provisioner","Chorus / Provisioner","The provisioner (chorus provision --listen, chorus up): nodes by status, attempts, queue.",[
 panel(1,"Nodes by status",[(f"sum by (status) (chorus_provisioner_nodes{I})","{{status}}")],0,0),
 panel(2,"In flight and queued",[(f"sum(chorus_provisioner_in_flight{I})","in flight"),(f"sum(chorus_provisioner_queued{I})","queued")],12,0),
 panel(3,"Provisioned and failed per minute",[
   (f"sum(increase(chorus_provisioner_provisioned_total{I}[1m]))","provisioned"),
   (f"sum(increase(chorus_provisioner_failed_total{I}[1m]))","failed"),
   (f"sum(increase(chorus_provisioner_retries_total{I}[1m]))","retries"),
   (f"sum(increase(chorus_provisioner_reprovisions_total{I}[1m]))","reprovisions")],0,8),
 panel(4,"Startups read per minute",[
   (f"sum(increase(chorus_provisioner_startups_total{I}[1m]))","startups"),
   (f"sum(increase(chorus_provisioner_duplicate_startups_total{I}[1m]))","duplicates"),
   (f"sum(increase(chorus_provisioner_stale_startups_total{I}[1m]))","stale"),
   (f"sum(increase(chorus_provisioner_provisioned_events_total{I}[1m]))","provisioned events")],12,8),
 panel(5,"Steps and dead letters per minute",[
   (f"sum(increase(chorus_provisioner_steps_ok_total{I}[1m]))","steps ok"),
   (f"sum(increase(chorus_provisioner_dead_lettered_total{I}[1m]))","dead-lettered")],0,16,w=24),
],"chorus_provisioner_startups_total")
dashes["chorus-audit.json"]=dashboard("chorus-audit","Chorus / Audit and AAA","AAA decisions (chorus aaa) and the audit export to the SIEM (chorus audit-export --listen, chorus up).",[
 panel(1,"AAA decisions per minute",[(f"sum by (kind, decision) (increase(chorus_aaa_decisions_total{I}[1m]))","{{kind}} {{decision}}")],0,0),
 panel(2,"AAA audit records not stored (per 5 minutes)",[(f"sum(increase(chorus_aaa_audit_failures_total{I}[5m]))","not stored")],12,0),
 panel(3,"Exported to the SIEM per second",[(f"sum(rate(chorus_audit_export_exported_total{I}[5m]))","exported")],0,8,unit="ops"),
 panel(4,"Export trouble per minute",[
   (f"sum(increase(chorus_audit_export_retries_total{I}[1m]))","retries"),
   (f"sum(increase(chorus_audit_export_dead_lettered_total{I}[1m]))","dead-lettered"),
   (f"sum(increase(chorus_audit_export_resent_total{I}[1m]))","resent"),
   (f"sum(increase(chorus_audit_export_connects_total{I}[1m]))","connects"),
   (f"sum(increase(chorus_audit_export_redeliveries_skipped_total{I}[1m]))","redeliveries skipped")],12,8),
 panel(5,"Audit outbox backlog (AAA)",[(f"sum(chorus_outbox_backlog{I})","backlog")],0,16,w=24),
],'{__name__=~"chorus_audit_export_exported_total|chorus_aaa_decisions_total"}')
dashes["chorus-reactor.json"]=dashboard("chorus-reactor","Chorus / Reactor","The reactor (chorus react --listen): evaluation, firings and actions.",[
 panel(1,"Evaluated and matched per second",[(f"sum(rate(chorus_reactor_evaluated_total{I}[5m]))","evaluated"),(f"sum(rate(chorus_reactor_matched_total{I}[5m]))","matched")],0,0,unit="ops"),
 panel(2,"Firings per minute",[(f"sum(increase(chorus_reactor_fired_total{I}[1m]))","fired"),(f"sum(increase(chorus_reactor_suppressed_total{I}[1m]))","suppressed")],12,0),
 panel(3,"Actions per minute",[(f"sum(increase(chorus_reactor_actions_succeeded_total{I}[1m]))","succeeded"),(f"sum(increase(chorus_reactor_actions_failed_total{I}[1m]))","failed"),(f"sum(increase(chorus_reactor_dead_lettered_total{I}[1m]))","dead-lettered")],0,8),
 panel(4,"Pending firings",[(f"sum(chorus_reactor_pending{I})","pending")],12,8),
],"chorus_reactor_evaluated_total")
for f,d in dashes.items():
    open(f,"w").write(json.dumps(d,indent=2)+"\n")
open("provisioning.yaml","w").write("""# Grafana dashboard provider for the Chorus dashboards: copy this file into
# /etc/grafana/provisioning/dashboards/; Grafana then loads every dashboard in the folder
# the chorus package installs them to.
apiVersion: 1
providers:
  - name: chorus
    folder: Chorus
    type: file
    disableDeletion: false
    allowUiUpdates: true
    options:
      path: /usr/share/chorus/grafana
""")
