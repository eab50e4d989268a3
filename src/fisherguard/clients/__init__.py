"""Client-side behaviour: local training and client-side regularisers."""
