"""Warm-up from recorded traffic: the heavy-hitter sketch, the traffic store, the planner and replayer."""
