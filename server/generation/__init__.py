"""Generation backends behind one narrow async interface (base.py); pick one with factory.create_backend."""
