"""The toy sprite world the miniature Wan is pretrained on (world.py), the oracle that scores clips
of it (oracle.py), and the script that renders the example concepts' videos (make_assets.py)."""
