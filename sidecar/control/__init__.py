"""The control plane: the state machine's driver, warm-up and loading, the traffic memory, the admin port."""
