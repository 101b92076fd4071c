"""Quality benchmark pieces: real text (`shakespeare`), the MiniLM encoder task (`encoder`), LoRA
initializers by name (`methods`) and the one-configuration runner (`runner`) the demo and the
benchmark share."""
