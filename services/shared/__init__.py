"""What every Roundtable service needs, written once: settings, server bootstrap, logging, metrics."""
