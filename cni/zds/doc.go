// Package zds is how the node agent hands each enrolled pod's network namespace to
// ztunnel, so ztunnel can open its listeners inside the pod (Istio ambient's in-pod
// mode). It follows Istio's ZDS ("ztunnel discovery service") but speaks JSON. Server
// is the agent side, Client the ztunnel side.
//
// # Protocol (version 1)
//
// The agent listens on a unix SOCK_SEQPACKET socket (DefaultSocket). Each packet holds
// exactly one JSON Message of at most MaxMessageSize bytes. Types:
//
//	hello          ztunnel -> agent  first packet; carries version.
//	add            agent -> ztunnel  uid, workload; exactly one fd (SCM_RIGHTS), the pod's
//	                                 netns opened O_RDONLY. Serve the pod; replaces any
//	                                 earlier add for the uid.
//	keep           agent -> ztunnel  uid, workload; no fd. The agent restarted and still
//	                                 has the pod enrolled but could not reopen its netns:
//	                                 go on serving it with what you have.
//	delete         agent -> ztunnel  uid. Stop serving the pod, close its listeners.
//	snapshot-done  agent -> ztunnel  the snapshot is complete.
//	ack            ztunnel -> agent  answers the agent's previous message; error is empty
//	                                 if it was applied, else says why not.
//
// After connecting ztunnel sends hello. If the agent does not speak that version it
// answers with an ack whose error says so and closes the connection. Otherwise it sends
// the snapshot, an add (or keep) for every pod it has enrolled, then snapshot-done, then
// add and delete as pods come and go. Once snapshot-done is acknowledged, ztunnel serves
// exactly the pods the snapshot named plus later adds, minus later deletes; pods it held
// from an earlier connection and the snapshot left out are gone.
//
// ztunnel acknowledges every message, in order, and the agent sends nothing more until
// it has the ack, so an agent operation returns only when ztunnel has applied it.
//
// Only packets listed above, with the fds listed above, are valid. The agent closes a
// connection that sends anything but hello then acks, that sends an ack with nothing
// outstanding, or that does not send hello, or an ack, within its timeout (5s by
// default); ztunnel reconnects and gets a fresh snapshot. ztunnel answers a packet it cannot accept
// (oversized, not JSON, unknown type, missing fields, wrong fds) with an ack error.
// File descriptors attached to a rejected packet are closed by the receiver.
//
// Only the newest connection gets messages; see Server.
package zds
