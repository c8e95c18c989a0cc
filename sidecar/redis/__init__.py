"""One Redis client layer for every part that uses the fleet's Redis: the cache tier, the traffic
store, the forecast history. One connection policy (short timeouts, no retry storm, a circuit
breaker, errors counted by kind, one warning per outage), one client per server."""
