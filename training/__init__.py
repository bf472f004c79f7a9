"""Training side of T-REX: the compiler transformer, the executor RNN, data and commands."""
