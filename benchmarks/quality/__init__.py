"""The quality protocol (`protocol`, one command) and its pieces: real text (`shakespeare`), the held-out
encoder tasks (`tasks`), the MiniLM encoder (`encoder`), LoRA initializers by name (`methods`), the encoder
run (`runner`, which the demo shares), the causal-LM SFT/DPO tasks (`causal`, `completions`) and the tables
and plot (`report`)."""
