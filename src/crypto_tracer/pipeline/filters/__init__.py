"""What each filter of the tool filters, and where it is applied.

  process filter     pid, uid, command name: in the kernel, for every probe
                     (probes/common.ProcessFilter, bpf/common.h struct ct_filter)
  event filter       monitor's --file globs and --library substrings, over decoded events
                     (filters/events.EventFilter)
  connection filter  the trailing FILTER of `tls` ('port 443 and host ::1'): one grammar,
                     applied to events' and sessions' connections in user space and compiled
                     to the kernel packet filter of -m pcapng (filters/connections.py)
  packet filter      what tc_capture.bpf.c applies to each packet before copying it
                     (filters/connections.PacketFilter, written by probes/tc_capture.py)
"""
