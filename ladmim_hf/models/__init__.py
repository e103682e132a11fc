"""The files shipped to the Hub with a model's weights: every module here, and nothing else.

They are flat (importing each other only relatively) and import only torch, numpy, PIL and
transformers, never the rest of `ladmim_hf`, so `AutoModel.from_pretrained(repo, trust_remote_code=True)`
runs them without the package installed. `ladmim_hf.hub` reads the list of shipped files from this
folder. Read them before you load a model from someone you do not know, and pin `revision=`.
"""
