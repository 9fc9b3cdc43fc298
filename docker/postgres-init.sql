-- The image's POSTGRES_USER is a superuser, which row-level security does not bind (the
-- daemon refuses to start as one). The tables' owner, as terraform's Cloud SQL user:
-- not a superuser, with CREATEROLE, so that `gannet db migrate` makes the daemon's role.
CREATE ROLE gannet LOGIN PASSWORD 'gannet' NOSUPERUSER NOBYPASSRLS CREATEROLE;
CREATE DATABASE gannet OWNER gannet;
