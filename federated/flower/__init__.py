"""fedleak's round loop on Flower (`engine.name = "flower"`): `records` turns adapters and client results
into Flower records, `engine` holds the ClientApp, the ServerApp's loop and the Simulation Engine run.
Needs the `fedleak[flower]` extra; nothing here is imported by the in-process engine."""
