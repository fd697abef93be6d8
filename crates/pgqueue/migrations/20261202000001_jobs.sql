-- The job queue shared by front ends and workers. Version 1.

CREATE TABLE flipsketch_jobs (
    id               text PRIMARY KEY,
    state            text NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    -- the validated settings (engine::JobSpec) and the sketch (PNG, on white, at most 512 px)
    spec             jsonb NOT NULL,
    sketch           bytea NOT NULL,
    steps            integer NOT NULL,
    seed             bigint NOT NULL,
    -- claims so far: the fencing token of every write a worker makes
    attempt          integer NOT NULL DEFAULT 0,
    -- leases that expired (a worker killed or cut off)
    lost             integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL,
    worker           text,
    lease_until      timestamptz,
    cancel_requested boolean NOT NULL DEFAULT false,
    progress         double precision NOT NULL DEFAULT 0,
    phase            text,
    step             integer,
    eta_s            double precision,
    error            text,
    -- set when done: the attempt that wrote the result, the file names, variants x frames
    result_attempt   integer,
    files            text[] NOT NULL DEFAULT '{}',
    variants         integer NOT NULL,
    frames           integer NOT NULL,
    -- grows at every change a client can see (event ids)
    version          bigint NOT NULL DEFAULT 1,
    queued_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    started_at       timestamptz,
    finished_at      timestamptz,
    -- the last time a client asked about the job
    client_seen      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX flipsketch_jobs_waiting ON flipsketch_jobs (queued_at) WHERE state = 'queued';
CREATE INDEX flipsketch_jobs_running ON flipsketch_jobs (lease_until) WHERE state = 'running';
CREATE INDEX flipsketch_jobs_finished ON flipsketch_jobs (finished_at) WHERE finished_at IS NOT NULL;

-- Result files kept in PostgreSQL (bytes NULL when they live in an object store).
CREATE TABLE flipsketch_files (
    job_id  text NOT NULL REFERENCES flipsketch_jobs (id) ON DELETE CASCADE,
    name    text NOT NULL,
    bytes   bytea,
    PRIMARY KEY (job_id, name)
);

CREATE TABLE flipsketch_workers (
    id          text PRIMARY KEY,
    host        text NOT NULL,
    pid         integer NOT NULL,
    device      text,
    dtype       text,
    image_size  integer,
    -- loading | ready | failed | stopped
    state       text NOT NULL,
    error       text,
    job_id      text,
    started_at  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now()
);

-- Every change a client can see bumps the version and is announced on the channel
-- 'flipsketch_jobs' (payload: the job id); front ends LISTEN and forward it to event streams.
CREATE FUNCTION flipsketch_jobs_version() RETURNS trigger AS $$
BEGIN
    IF ROW(NEW.state, NEW.progress, NEW.phase, NEW.step, NEW.eta_s, NEW.error, NEW.attempt, NEW.files)
       IS DISTINCT FROM
       ROW(OLD.state, OLD.progress, OLD.phase, OLD.step, OLD.eta_s, OLD.error, OLD.attempt, OLD.files) THEN
        NEW.version := OLD.version + 1;
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER flipsketch_jobs_version BEFORE UPDATE ON flipsketch_jobs
    FOR EACH ROW EXECUTE FUNCTION flipsketch_jobs_version();

CREATE FUNCTION flipsketch_jobs_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('flipsketch_jobs', NEW.id);
    RETURN NEW;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER flipsketch_jobs_inserted AFTER INSERT ON flipsketch_jobs
    FOR EACH ROW EXECUTE FUNCTION flipsketch_jobs_notify();
CREATE TRIGGER flipsketch_jobs_changed AFTER UPDATE ON flipsketch_jobs
    FOR EACH ROW WHEN (NEW.version <> OLD.version) EXECUTE FUNCTION flipsketch_jobs_notify();
