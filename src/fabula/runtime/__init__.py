"""Files fabula puts into every release; they run on the servers, in the app's virtualenv."""
